"""Stock gRPC clients against a running rook-rbd driver: Identity, then CreateVolume and
DeleteVolume on the dev cluster, each result checked (the image with the rbd CLI).

    clients.py grpcio  --socket S --cluster-dir D --stubs DIR  --version V
    clients.py grpcurl --socket S --cluster-dir D --grpcurl BIN --version V

Both clients speak JSON here (grpcio through protobuf's json_format), so one scenario serves both.
Secrets go to the clients on stdin or in memory, never in argv.
"""

import argparse
import json
import time
import os
import re
import subprocess
import sys

DRIVER_NAME = "rbd.csi.ceph.rook.io"
SIZE = 64 << 20


class Grpcio:
    """grpcio from PyPI with default channel options, as a user would write it."""

    def __init__(self, target, stubs):
        sys.path.insert(0, stubs)
        import grpc
        import csi_pb2
        import csi_pb2_grpc
        from google.protobuf import json_format

        self.grpc, self.pb, self.json_format = grpc, csi_pb2, json_format
        self.channel = grpc.insecure_channel(target)
        self.stubs = {
            "Identity": csi_pb2_grpc.IdentityStub(self.channel),
            "Controller": csi_pb2_grpc.ControllerStub(self.channel),
        }
        self.name = f"grpcio {grpc.__version__} ({target})"

    def call(self, service, method, request):
        req = self.json_format.ParseDict(request, getattr(self.pb, method + "Request")())
        try:
            resp = getattr(self.stubs[service], method)(req, timeout=60)
        except self.grpc.RpcError as e:
            raise SystemExit(f"{self.name}: {method}: {e.code().name}: {e.details()}")
        return self.json_format.MessageToDict(resp)


class Grpcurl:
    """grpcurl through server reflection (no proto file given)."""

    def __init__(self, binary, socket, authority=None):
        # A unix:// target, not -unix with a bare path: grpcurl 1.9.2 and 1.9.3 dial a bare path
        # over TCP (fullstorydev/grpcurl#496).
        self.binary, self.target = binary, f"unix://{socket}"
        self.flags = ["-plaintext", "-max-time", "60"]
        self.name = f"grpcurl ({self.target})"
        if authority is not None:
            self.flags += ["-authority", authority]
            self.name = f"grpcurl ({self.target}, :authority {authority})"

    def run(self, *args, stdin=None):
        out = subprocess.run(
            [self.binary, *self.flags, *args],
            input=stdin, capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"{self.name}: {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def services(self):
        return self.run(self.target, "list").split()

    def call(self, service, method, request):
        # -d @ reads the request from stdin, so secrets stay out of argv.
        out = self.run("-d", "@", self.target, f"csi.v1.{service}/{method}",
                       stdin=json.dumps(request))
        return json.loads(out)


def check(what, ok, got):
    if not ok:
        raise SystemExit(f"FAIL: {what}: got {got!r}")
    print(f"  ok: {what}")


def rbd(cluster_dir, *args):
    return subprocess.run(["rbd", "-c", os.path.join(cluster_dir, "ceph.conf"), *args],
                          capture_output=True, text=True)


def read_params(cluster_dir):
    """params.yaml is flat `key: "value"` lines, written by scripts/ceph-dev.sh."""
    params = {}
    with open(os.path.join(cluster_dir, "params.yaml")) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() and not key.startswith("#"):
                params[key.strip()] = value.strip().strip('"')
    return params


def identity(client, version):
    info = client.call("Identity", "GetPluginInfo", {})
    check("GetPluginInfo names the driver", info.get("name") == DRIVER_NAME, info)
    check("GetPluginInfo gives the version", info.get("vendorVersion") == version, info)
    probe = client.call("Identity", "Probe", {})
    check("Probe is ready on a healthy cluster", probe.get("ready") is True, probe)
    caps = client.call("Identity", "GetPluginCapabilities", {}).get("capabilities", [])
    check("GetPluginCapabilities has CONTROLLER_SERVICE",
          {"service": {"type": "CONTROLLER_SERVICE"}} in caps, caps)
    check("GetPluginCapabilities has online expansion",
          {"volumeExpansion": {"type": "ONLINE"}} in caps, caps)


def create_and_delete(client, cluster_dir, tag):
    params = read_params(cluster_dir)
    with open(os.path.join(cluster_dir, "admin.key")) as f:
        secrets = {"userID": "admin", "userKey": f.read().strip()}
    request = {
        "name": f"interop-{tag}-{os.getpid()}",
        "capacityRange": {"requiredBytes": str(SIZE)},
        "volumeCapabilities": [{"mount": {"fsType": "ext4"},
                                "accessMode": {"mode": "SINGLE_NODE_WRITER"}}],
        "parameters": params,
        "secrets": secrets,
    }
    volume_id = None
    try:
        vol = client.call("Controller", "CreateVolume", request).get("volume", {})
        volume_id = vol.get("volumeId", "")
        m = re.fullmatch(r"0001-([0-9a-f]{4})-(.+)-([0-9a-f]{4})-(.+)-(csi-vol-[^/@]+)", volume_id)
        check("CreateVolume gives a 0001-<cluster>-<pool>-csi-vol-... ID",
              m is not None and m.group(2) == params["clusterID"] and m.group(4) == params["pool"]
              and int(m.group(1), 16) == len(params["clusterID"])
              and int(m.group(3), 16) == len(params["pool"]), volume_id)
        check("CreateVolume reports the capacity", int(vol.get("capacityBytes", 0)) == SIZE, vol)
        image = f'{params["pool"]}/{m.group(5)}'
        info = rbd(cluster_dir, "info", "--format", "json", image)
        check(f"rbd info {image} finds the image", info.returncode == 0, info.stderr.strip())
        check("the image has the requested size", json.loads(info.stdout)["size"] == SIZE,
              info.stdout)
        client.call("Controller", "DeleteVolume", {"volumeId": volume_id, "secrets": secrets})
        volume_id = None
        gone = rbd(cluster_dir, "info", image)
        check(f"rbd info {image} fails after DeleteVolume",
              gone.returncode != 0 and "No such file" in gone.stderr, gone.stderr.strip())
        # DeleteVolume moves the image to the RBD trash and returns; the driver's purger removes
        # it in the background (no deferment here), within moments.
        deadline = time.monotonic() + 30
        while True:
            trash = rbd(cluster_dir, "trash", "ls", params["pool"]).stdout
            if m.group(5) not in trash or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        check("the image is purged from the trash within 30 s", m.group(5) not in trash, trash)
    finally:
        if volume_id:
            client.call("Controller", "DeleteVolume", {"volumeId": volume_id, "secrets": secrets})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("client", choices=["grpcio", "grpcurl"])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--cluster-dir", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--stubs")
    ap.add_argument("--grpcurl")
    args = ap.parse_args()
    if args.client == "grpcio":
        # Both spellings grpc documents for a Unix socket target.
        for target in (f"unix://{args.socket}", f"unix:{args.socket}"):
            client = Grpcio(target, args.stubs)
            print(client.name)
            identity(client, args.version)
    else:
        client = Grpcurl(args.grpcurl, args.socket)
        print(client.name)
        services = client.services()
        check("reflection lists the three CSI services",
              {"csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node"} <= set(services), services)
        identity(client, args.version)
        # grpc-java on netty (DomainSocketAddress) sends the socket path as it is.
        java_like = Grpcurl(args.grpcurl, args.socket, authority=args.socket)
        print(java_like.name)
        identity(java_like, args.version)
    create_and_delete(client, args.cluster_dir, args.client)
    print(f"{client.name}: all checks passed")


if __name__ == "__main__":
    main()
