#!/usr/bin/env bash
# Certificates for the index's etcd (k8s/etcd/etcd.yaml in TLS, with the
# component k8s/components/etcd-tls) and its clients, the kvbm nodes (the
# component k8s/components/etcd-client): a CA, one server/peer certificate
# for every member's name, one client certificate for the nodes. etcd then
# takes clients with a certificate from this CA only (--client-cert-auth):
# no other pod reads or writes the index.
#
#   k8s/etcd/make-certs.sh DIR            # writes DIR/{ca,etcd,kvbm-node}.{crt,key}
#   k8s/etcd/make-certs.sh DIR --apply    # and creates the two Secrets with kubectl
#
# Keep DIR/ca.key offline. Uses openssl only; cert-manager can issue the
# same two Secrets instead (kvbm-etcd-tls, kvbm-etcd-client: tls.crt, tls.key, ca.crt).
set -euo pipefail
dir=${1:?usage: make-certs.sh DIR [--apply]}
ns=${KVBM_K8S_NAMESPACE:-kvbm}
days=${DAYS:-825}
mkdir -p "$dir"
umask 077
cd "$dir"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=kvbm-etcd-ca" -keyout ca.key -out ca.crt 2>/dev/null

issue() {  # name, extended key usage, subjectAltName
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$1" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=%s\n%s\n' "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

members="DNS:*.kvbm-etcd.$ns.svc,DNS:*.kvbm-etcd.$ns.svc.cluster.local"
members="$members,DNS:kvbm-etcd.$ns.svc,DNS:localhost,IP:127.0.0.1"
issue etcd serverAuth,clientAuth "subjectAltName=$members"
issue kvbm-node clientAuth ""
echo "certificates in $dir: ca.crt, etcd.{crt,key}, kvbm-node.{crt,key}"

if [[ "${2:-}" == "--apply" ]]; then
  kubectl -n "$ns" create secret generic kvbm-etcd-tls \
    --from-file=tls.crt=etcd.crt --from-file=tls.key=etcd.key --from-file=ca.crt=ca.crt
  kubectl -n "$ns" create secret generic kvbm-etcd-client \
    --from-file=tls.crt=kvbm-node.crt --from-file=tls.key=kvbm-node.key --from-file=ca.crt=ca.crt
fi
