"""Scripts and helpers the tests run or import: node daemons, peers that lie,
the synthetic engine. Nothing here is collected as a test."""
