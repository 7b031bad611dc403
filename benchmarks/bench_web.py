"""Time per decoded frame and per dream step in the reader's browser, beside PyTorch on the same CPU.

    python benchmarks/bench_web.py [--decodes 200] [--steps 300] [--threads 1]

Browser: the built book (``_build/html``, ``make book``) served over local HTTP and opened in
headless Chromium (Debian's ``chromium``, or ``WM_CHROMIUM``); the latent explorer of chapter 3
decodes after each of `--decodes` slider moves, one at a time, and the drive in chapter 6
runs `--steps` dream steps (M's step with its sampling, then V's decode). The times are
those the widgets measure (``globalThis.wmWebTimes``: onnxruntime-web, wasm backend, one
thread). PyTorch: the same models (the shipped ``book`` run), batch 1, `--threads` threads:
V's ``decode`` and ``MDRNN.step`` + ``sample_next_z`` + ``decode``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

import worldmodels as wm
from worldmodels.mdrnn import sample_next_z

HTML = Path(__file__).resolve().parents[1] / "_build" / "html"

_DECODES = """async n => {
  const times = globalThis.wmWebTimes;
  const sliders = [...document.querySelectorAll('.wm-web-view input[data-dim]')];
  for (let i = 0; i < n; i++) {
    const before = times.decode.length;
    const s = sliders[i % sliders.length];
    s.value = i % 2 ? s.min : s.max;
    s.dispatchEvent(new Event('input'));
    while (times.decode.length === before) await new Promise(r => setTimeout(r, 0));
  }
  return times.decode.slice(-n);
}"""

_STEPS = """async n => {
  const view = document.querySelector('.wm-web-view[data-wm-ready]');
  const button = view.querySelector('button[data-action="straight"]');
  for (let i = 0; i < n; i++) button.click();
  while (Number(view.dataset.wmSteps || 0) < n) await new Promise(r => setTimeout(r, 5));
  return globalThis.wmWebTimes.step.slice(-n);
}"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def browser_times(decodes: int, steps: int) -> tuple[list[float], list[float]]:
    from playwright.sync_api import sync_playwright

    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{httpd.server_address[1]}"
    chromium = os.environ.get("WM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(root) else r.abort())
            page.goto(f"{root}/book/03_vae.html")
            page.wait_for_selector(".wm-web-view[data-wm-ready]", timeout=60_000)
            decode_ms = page.evaluate(_DECODES, decodes)
            page.goto(f"{root}/book/06_dream.html")
            page.wait_for_selector(".wm-web-view[data-wm-ready]", timeout=60_000)
            step_ms = page.evaluate(_STEPS, steps)
            browser.close()
    finally:
        httpd.shutdown()
    return decode_ms, step_ms


@torch.no_grad()
def torch_times(decodes: int, steps: int) -> tuple[list[float], list[float]]:
    book = wm.pretrained.load("book", controller="first")  # the models the book's pages run
    vae, mdrnn = book.agent.vae.eval(), book.agent.mdrnn.eval()
    g = torch.Generator().manual_seed(0)
    decode_ms = []
    for _ in range(decodes):
        z = torch.randn(1, vae.z_size, generator=g)
        start = time.perf_counter()
        vae.decode(z)
        decode_ms.append(1e3 * (time.perf_counter() - start))
    z, state, step_ms = torch.randn(1, vae.z_size, generator=g), None, []
    action = torch.tensor([[0.0, 0.3, 0.0]])
    for _ in range(steps):
        start = time.perf_counter()
        out, state = mdrnn.step(z, action, state)
        z = sample_next_z(out, 1.0, g)
        vae.decode(z)
        step_ms.append(1e3 * (time.perf_counter() - start))
    return decode_ms, step_ms


def summary(ms: list[float]) -> str:
    rest = ms[1:]
    return f"median {statistics.median(rest):6.2f} ms, p90 {np.percentile(rest, 90):6.2f} ms, first {ms[0]:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decodes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (HTML / "book" / "03_vae.html").exists():
        raise SystemExit(f"{HTML}: the book is not built; run `make book` first")
    torch.set_num_threads(args.threads)
    web_decode, web_step = browser_times(args.decodes, args.steps)
    torch_decode, torch_step = torch_times(args.decodes, args.steps)
    print(f"{'':34s} {'per decode':44s} per dream step (M + sampling + decode)")
    print(f"{'browser (onnxruntime-web, wasm)':34s} {summary(web_decode):44s} {summary(web_step)}")
    print(f"{f'PyTorch CPU ({args.threads} thread)':34s} {summary(torch_decode):44s} {summary(torch_step)}")


if __name__ == "__main__":
    main()
