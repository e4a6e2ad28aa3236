"""`kvbm bench ...`: measured figures with their physical references, as JSON."""
