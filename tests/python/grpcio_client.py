"""A Python grpcio client for streambridge, driven by tests/python_grpcio.rs.

Generates stubs from the seed's proto (tests/python/seed/data_service.proto, the
contract exactly as the seed states it) with grpcio-tools, then streams through
the server given as argv[1] (host:port) and checks every reply. Exits non-zero
with a message on the first mismatch; prints one JSON summary line on success.

With `sending-at-shutdown` as argv[2] it instead keeps 8 streams sending
until the server ends them (the test sends SIGTERM) and reports each status.

With GRPC_ROOT_CERT set to a PEM file, it connects over TLS trusting that CA
(a load balancer in front of the server: tests/deploy.rs).
"""

import importlib
import json
import os
import pathlib
import queue
import sys
import tempfile

import grpc
from grpc_tools import protoc

SEED_DIR = pathlib.Path(__file__).resolve().parent / "seed"
TIMEOUT_S = 30


def generate_stubs(out_dir):
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{SEED_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
         str(SEED_DIR / "data_service.proto")]
    )
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")
    sys.path.insert(0, str(out_dir))
    return importlib.import_module("data_service_pb2"), importlib.import_module("data_service_pb2_grpc")


def expect(actual, wanted, what):
    if actual != wanted:
        sys.exit(f"{what}: expected {wanted!r}, got {actual!r}")


def seed_usage(stub, pb2):
    """The tutorial's client: send msg 0..4, CloseSend, read until EOF."""
    requests = (pb2.StreamRequest(data=f"msg {i}") for i in range(5))
    replies = [r.result for r in stub.BidirectionalStream(requests, timeout=TIMEOUT_S)]
    expect(replies, [f"processed: msg {i}" for i in range(5)], "seed usage")
    return len(replies)


def pipelined(stub, pb2, count):
    requests = (pb2.StreamRequest(data=f"python {i} ü") for i in range(count))
    replies = [r.result for r in stub.BidirectionalStream(requests, timeout=TIMEOUT_S)]
    expect(replies, [f"processed: python {i} ü" for i in range(count)], "pipelined")
    return len(replies)


def interleaved(stub, pb2, turns):
    """Each reply arrives before the next request exists: true bidi streaming."""
    outbox = queue.Queue()
    done = object()

    def requests():
        while True:
            item = outbox.get(timeout=TIMEOUT_S)
            if item is done:
                return
            yield item

    outbox.put(pb2.StreamRequest(data="turn 0"))
    call = stub.BidirectionalStream(requests(), timeout=TIMEOUT_S)
    seen = 0
    for reply in call:
        expect(reply.result, f"processed: turn {seen}", "interleaved")
        seen += 1
        outbox.put(pb2.StreamRequest(data=f"turn {seen}") if seen < turns else done)
    expect(seen, turns, "interleaved replies")
    return seen


def sending_at_shutdown(target, pb2, pb2_grpc, channels, streams_per_channel):
    """Streams that never stop sending; prints READY once each has replies,
    then waits for the server (being shut down by the test) to end them all,
    and prints each stream's final status as JSON."""
    import threading

    ready = threading.Barrier(channels * streams_per_channel + 1)
    outcomes = []
    lock = threading.Lock()

    def endless():
        i = 0
        while True:
            yield pb2.StreamRequest(data=f"drain {i}")
            i += 1

    def stream(stub):
        replies = 0
        try:
            for _ in stub.BidirectionalStream(endless(), timeout=TIMEOUT_S):
                replies += 1
                if replies == 50:
                    ready.wait(timeout=TIMEOUT_S)
            outcome = {"code": "OK", "details": "", "replies": replies}
        except grpc.RpcError as error:
            outcome = {"code": error.code().name, "details": error.details(), "replies": replies}
        with lock:
            outcomes.append(outcome)

    opened = [channel_to(target) for _ in range(channels)]
    threads = [
        threading.Thread(target=stream, args=(pb2_grpc.DataServiceStub(channel),))
        for channel in opened
        for _ in range(streams_per_channel)
    ]
    for thread in threads:
        thread.start()
    ready.wait(timeout=TIMEOUT_S)
    print("READY", flush=True)
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    print(json.dumps(outcomes), flush=True)


def channel_to(target):
    """A channel to `target`: TLS trusting GRPC_ROOT_CERT when set, else cleartext."""
    root = os.environ.get("GRPC_ROOT_CERT")
    if root is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(root).read_bytes())
    return grpc.secure_channel(target, credentials)


def main():
    target = sys.argv[1]
    with tempfile.TemporaryDirectory() as out_dir:
        pb2, pb2_grpc = generate_stubs(out_dir)
        if sys.argv[2:3] == ["sending-at-shutdown"]:
            sending_at_shutdown(target, pb2, pb2_grpc, channels=4, streams_per_channel=2)
            return
        with channel_to(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
            stub = pb2_grpc.DataServiceStub(channel)
            summary = {
                "seed_usage": seed_usage(stub, pb2),
                "pipelined": pipelined(stub, pb2, 1000),
                "interleaved": interleaved(stub, pb2, 20),
                "grpcio": grpc.__version__,
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
