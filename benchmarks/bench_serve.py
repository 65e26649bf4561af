"""`calm serve` under load: concurrent clients against one at a time, on ESC-10 clips, 127.0.0.1 only.

    python benchmarks/bench_serve.py [--model MODEL.safetensors] [--clients 8] [--requests 25]
        [--sequential 25] [--max-batch 16] [--max-wait-ms 10] [--threads N] [--replicas 1,2]
        [--time-limit 600] [--data DIR]

Without --model, fits a CALM on whisper-tiny.en features (`-o encoder_length=clip`) of
--support clips per ESC-10 class with `calm extract` + `calm fit` in a temporary folder. Then
starts `calm serve` on a free port of 127.0.0.1 and measures, in this order (so the sequential
figure brackets the concurrent one on a shared machine):

1. sequential: --sequential requests, one at a time, one client;
2. concurrent: --clients threads each sending --requests requests back to back;
3. sequential again.

Prints requests/s, p50/p95/p99 latency, the mean model batch size (from the server's access log),
the server's CPU-seconds per request (robust to other load on the machine), the load average,
and the ratio concurrent / sequential requests/s (target >= 1.5). `--replicas 1,2` (the default)
measures a server per value, one after the other, so that the ratios of one run compare one copy
of the model with one per core; each concurrent figure is also given against the first server's
sequential requests/s. `--model-cpu-only`: no server, the CPU-seconds per clip of the model alone
at batch 1, 4 and 8 (what batching can save). Bounded: at most clients x requests + 2 x sequential
requests per server, and no new request after --time-limit seconds per server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "calm.cli"]


def esc10_root(arg: str | None) -> Path:
    root = (
        Path(arg)
        if arg
        else Path(os.environ.get("CALM_TEST_DATA", ROOT.parent / "shared" / "data")) / "esc10"
    )
    if not root.is_dir():
        sys.exit(f"ESC-10 not found at {root}: pass --data DIR or set CALM_TEST_DATA")
    return root


def fit_model(root: Path, work: Path, support: int) -> Path:
    data = work / "support"
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        (data / cls.name).mkdir(parents=True)
        for f in sorted(cls.glob("*.ogg"))[:support]:
            shutil.copy(f, data / cls.name / f.name)
    store, model = work / "store", work / "model.safetensors"
    extract = ["extract", "--data", f"folder:{data}", "--out", str(store), "-o", "encoder_length=clip"]
    subprocess.run([*CLI, *extract, "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*CLI, "fit", str(store), "--out", str(model)], check=True, stdout=subprocess.DEVNULL)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, clips: list[bytes], clients: int, per_client: int, deadline: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=300) as http:
            for i in range(per_client):
                if time.monotonic() > deadline:
                    return
                body = clips[(c * per_client + i) % len(clips)]
                t = time.perf_counter()
                r = http.post(url + "/predict", content=body, headers={"Content-Type": "audio/ogg"})
                with lock:
                    latencies.append(time.perf_counter() - t)
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sum(s == 200 for s in statuses)
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(statuses),
        "ok": ok,
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "wall_s": round(wall, 2),
        "rps": round(ok / wall, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def phase(name: str, server, url: str, clips, clients: int, per_client: int, deadline: float) -> dict:
    log_from = len(server["log"].read_text().splitlines())
    cpu0 = cpu_seconds(server["proc"].pid)
    res = run_clients(url, clips, clients, per_client, deadline)
    res["server_cpu_s_per_request"] = round((cpu_seconds(server["proc"].pid) - cpu0) / max(1, res["ok"]), 3)
    lines = [json.loads(x) for x in server["log"].read_text().splitlines()[log_from:] if x.strip()]
    sizes = [x["batch_size"] for x in lines if x.get("path") == "/predict" and x.get("batch_size")]
    res["mean_batch"] = round(float(np.mean(sizes)), 2) if sizes else None
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    print(f"{name:>12}: {json.dumps(res)}", flush=True)
    return res


def model_cpu(model: Path, clips: list[bytes], threads: int | None) -> None:
    """In-process, no HTTP: CPU-seconds per clip of `Predictor.forward` at batch 1, 4 and 8."""
    import torch

    from calm.inference import load_predictor

    if threads:
        torch.set_num_threads(threads)
    pred = load_predictor(model)
    waves = [pred.preprocess(c).waveform for c in clips[:8]]
    pred.forward(waves[:2])  # warm-up
    for bs in (1, 4, 8):
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(0, len(waves), bs):
            pred.forward(waves[i : i + bs])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"model only, {torch.get_num_threads()} threads, batch {bs}: {cpu / len(waves):.3f} CPU-s "
            f"and {wall / len(waves):.3f} s per clip (load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )


def measure(args, model: Path, clips: list[bytes], work: Path, replicas: int) -> dict:
    """One server with `replicas` copies of the model: sequential, concurrent, sequential again
    (no new request after --time-limit seconds)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / f"access-{replicas}.log"
    cmd = [*CLI, "serve", str(model), "--port", str(port), "--max-batch", str(args.max_batch)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--replicas", str(replicas)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    with log.open("w") as out, (work / "server.err").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
    server = {"proc": proc, "log": log}
    try:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            sys.exit("the server did not start: see " + str(work / "server.err"))
        print(f"--replicas {replicas}; load average {os.getloadavg()}", flush=True)
        deadline = time.monotonic() + args.time_limit
        run_clients(url, clips, 1, 2, deadline)  # warm-up
        seq1 = phase("sequential", server, url, clips, 1, args.sequential, deadline)
        conc = phase("concurrent", server, url, clips, args.clients, args.requests, deadline)
        seq2 = phase("sequential", server, url, clips, 1, args.sequential, deadline)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    seq_rps = (seq1["rps"] + seq2["rps"]) / 2
    return {
        "replicas": replicas,
        "sequential": [seq1, seq2],
        "concurrent": conc,
        "sequential_rps": seq_rps,
        "ratio": conc["rps"] / seq_rps if seq_rps else float("nan"),
        "server_exit": proc.returncode,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--support", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--sequential", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--threads", type=int, default=None, help="calm serve --threads")
    ap.add_argument(
        "--replicas", default="1,2", help="calm serve --replicas: one server per value, in this order"
    )
    ap.add_argument("--time-limit", type=float, default=600)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--model-cpu-only", action="store_true", help="Only time the model in-process.")
    args = ap.parse_args()
    root = esc10_root(args.data)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = Path(args.model) if args.model else fit_model(root, work, args.support)
    clips = [p.read_bytes() for p in sorted(root.glob("*/*.ogg"))[1::7][:40]]  # spread over classes
    if args.model_cpu_only:
        return model_cpu(model, clips, args.threads)
    print(f"model {model}; {os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)
    runs = [measure(args, model, clips, work, int(r)) for r in args.replicas.split(",")]
    base = runs[0]["sequential_rps"]
    for run in runs:
        conc = run["concurrent"]
        print(
            f"--replicas {run['replicas']}: concurrent {conc['rps']:.2f} req/s vs sequential "
            f"{run['sequential_rps']:.2f} req/s: {run['ratio']:.2f}x (target >= 1.5); "
            f"{conc['rps'] / base:.2f}x the sequential req/s of --replicas {runs[0]['replicas']}; "
            f"p50/p95/p99 {conc['p50_ms']:.0f}/{conc['p95_ms']:.0f}/{conc['p99_ms']:.0f} ms; "
            f"mean batch {conc['mean_batch']}; server exit {run['server_exit']}",
            flush=True,
        )
    print(f"load average {os.getloadavg()}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
