#!/usr/bin/env bash
# Builds, or reuses, every Kubernetes binary the e2e stage needs, at pinned versions, from the Go
# module proxy only. Each tool lands in its own versioned folder under the cache, outside the clone:
#   $ROOK_RBD_CACHE/k8s/<name>@<version>/<binaries>
# so a second run on the same machine is a few `test -x`, and bumping one version rebuilds one tool.
# `tools.sh bin` prints the folder of symlinks to use as PATH; `tools.sh build` builds what is missing.
#
# Most of these modules cannot be `go install`ed (their go.mod carries replace directives that point
# into the repository), so each is built from a small wrapper module:
#   k8s.io/kubernetes: every `k8s.io/x => ./staging/src/k8s.io/x` becomes `k8s.io/x v0.<minor>.<patch>`;
#   etcd, the CSI sidecars: upstream's version-pinned replaces are copied, local ones become requires.
set -euo pipefail
CACHE=${ROOK_RBD_CACHE:-$HOME/.cache/rook-rbd}
K=$CACHE/k8s
export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOFLAGS=-buildvcs=false CGO_ENABLED=0
export GOPROXY=${GOPROXY:-https://proxy.golang.org} GOTOOLCHAIN=local
PATH=/usr/local/go/bin:$PATH

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
# name version module packages...  (one line per tool; the folder name is name@version)
TOOLS=(
  "kubernetes $K8S_VERSION k8s.io/kubernetes cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl cmd/kube-proxy"
  "e2e $K8S_VERSION k8s.io/kubernetes test/e2e test/images/agnhost"
  "etcd $ETCD_VERSION go.etcd.io/etcd server/v3 etcdctl/v3"
  "crictl v1.34.0 sigs.k8s.io/cri-tools cmd/crictl"
  "csi-provisioner v6.4.0 github.com/kubernetes-csi/external-provisioner/v6 cmd/csi-provisioner"
  "csi-attacher v4.13.0 github.com/kubernetes-csi/external-attacher/v4 cmd/csi-attacher"
  "csi-resizer v2.3.0 github.com/kubernetes-csi/external-resizer/v2 cmd/csi-resizer"
  "csi-snapshotter v8.7.0 github.com/kubernetes-csi/external-snapshotter/v8 cmd/csi-snapshotter cmd/snapshot-controller"
)

log() { printf '[k8s-tools] %s\n' "$*" >&2; }

# The wrapper go.mod for k8s.io/kubernetes at $1.
k8s_wrapper() {
  local ver=$1 dir=$2 upmod staging
  upmod=$(go mod download -json "k8s.io/kubernetes@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  staging=v0.${ver#v1.}
  {
    echo "module rook-rbd.local/k8s-wrapper"; echo
    grep -E '^(go|godebug) ' "$upmod"; echo
    echo "require k8s.io/kubernetes $ver"; echo
    echo "replace ("
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging"'#p' "$upmod"
    echo ")"
  } >"$dir/go.mod"
}

# The wrapper go.mod for a module whose replaces are version-pinned or local ($1 module, $2 version).
generic_wrapper() {
  local mod=$1 ver=$2 dir=$3 upmod repl
  upmod=$(go mod download -json "$mod@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  repl=$(awk '/^replace \(/{b=1;next} b&&/^\)/{b=0;next} b{print;next} /^replace /{sub(/^replace /,"");print}' "$upmod" | sed 's/^\s*//')
  {
    echo "module rook-rbd.local/wrapper"; echo
    grep -E '^go ' "$upmod"; echo
    echo "require $mod $ver"
    echo "$repl" | awk -v v="$ver" '$3 ~ /^\.\.?\// {print "require " $1 " " v}'
    echo "$repl" | awk '$3 !~ /^\.\.?\// && NF>=4 {print "replace " $0}'
  } >"$dir/go.mod"
}

build_tool() {
  local name=$1 ver=$2 mod=$3; shift 3
  local out=$K/$name@$ver dir=$K/.wrap-$name@$ver pkgs=() p t0=$SECONDS
  [[ -f $out/.complete ]] && return 0
  log "building $name $ver (cold: minutes)"
  rm -rf "$dir" "$out.tmp"; mkdir -p "$dir" "$out.tmp"
  case $name in
    kubernetes|e2e) k8s_wrapper "$ver" "$dir" ;;
    etcd) printf 'module rook-rbd.local/etcd-wrapper\n\ngo 1.24\n' >"$dir/go.mod" ;;
    *) generic_wrapper "$mod" "$ver" "$dir" ;;
  esac
  for p in "$@"; do pkgs+=("$mod/$p"); done
  local minor ldf
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldf="-s -w -X main.version=$ver"
  if [[ $mod == k8s.io/kubernetes ]]; then
    ldf="-s -w -X k8s.io/component-base/version.gitVersion=$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  fi
  (
    cd "$dir"
    if [[ $name == etcd ]]; then
      # Both packages are named "v3": give each binary its own name.
      go get "$mod/server/v3@$ver" "$mod/etcdctl/v3@$ver"
      nice -n 19 go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcd" "$mod/server/v3"
      nice -n 19 go build -trimpath -ldflags "-s -w" -o "$out.tmp/etcdctl" "$mod/etcdctl/v3"
    elif [[ $name == e2e ]]; then
      go get -t "k8s.io/kubernetes/test/e2e@$ver" "k8s.io/kubernetes/test/images/agnhost@$ver"
      nice -n 19 go test -c -trimpath -ldflags "$ldf" -o "$out.tmp/e2e.test" k8s.io/kubernetes/test/e2e
      nice -n 19 go build -trimpath -ldflags "-s -w" -o "$out.tmp/" k8s.io/kubernetes/test/images/agnhost
    else
      go get $(for p in "${pkgs[@]}"; do echo "$p@$ver"; done)
      nice -n 19 go build -trimpath -ldflags "$ldf" -o "$out.tmp/" "${pkgs[@]}"
    fi
  ) >"$K/build-$name@$ver.log" 2>&1 || { tail -30 "$K/build-$name@$ver.log" >&2; log "$name failed"; return 1; }
  touch "$out.tmp/.complete"
  rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$dir"
  log "built $name $ver in $((SECONDS - t0)) s"
}

bin_dir() {
  local b=$K/bin line name ver
  mkdir -p "$b"
  for line in "${TOOLS[@]}"; do
    read -r name ver _ <<<"$line"
    for f in "$K/$name@$ver"/*; do [[ -x $f && -f $f ]] && ln -sf "$f" "$b/$(basename "$f")"; done
  done
  echo "$b"
}

case ${1:-build} in
  build)
    mkdir -p "$K"
    command -v go >/dev/null || { log "go is needed (test tooling only)"; exit 1; }
    for line in "${TOOLS[@]}"; do
      # shellcheck disable=SC2086
      build_tool $line
    done
    bin_dir >/dev/null
    log "all tools in $(bin_dir)"
    ;;
  bin) bin_dir ;;
  *) echo "usage: $0 [build|bin]" >&2; exit 2 ;;
esac
