"""Run a stage exactly as `python -m python_steps.<stage>` does, logging every unit of expensive work.

Usage (from a project folder): `FRET_CALL_LOG=calls.log python -m callhook queries`.

Each line is appended with one `write` to a file opened O_APPEND *before* the work starts, so a
SIGKILL never loses a line for work that had started:
    request <cache key> <sha256 of the prompt>   every generation request the stage builds
    generate <sha256 of the prompt>              a row sent to the LLM for generation
    generated <sha256 of the prompt>             ... and its answer back (not yet cached)
    score <cache key>                            a prompt sent to the LLM for scoring
    scored <cache key>                           ... and its scores back (not yet cached)
    train-step <n>                               an optimisation step of the train stage
The library is not modified: the hooks wrap its functions before the stage module runs.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import sys


def install(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(lines: list[str]) -> None:
        if lines:
            os.write(fd, ("\n".join(lines) + "\n").encode())

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:24]

    import pipeline.llm.generate as generate
    import pipeline.llm.transformers_backend as backend

    build_requests = generate.build_requests

    def logged_build_requests(*args, **kwargs):
        requests = build_requests(*args, **kwargs)
        log([f"request {r.key} {sha(r.prompt)}" for r in requests])
        return requests

    generate.build_requests = logged_build_requests

    generate_json = backend.TransformersLLM.generate_json

    def logged_generate_json(self, prompts, *args, **kwargs):  # any signature: the wrapper only watches
        log([f"generate {sha(p)}" for p in prompts])
        out = generate_json(self, prompts, *args, **kwargs)
        log([f"generated {sha(p)}" for p in prompts])
        return out

    backend.TransformersLLM.generate_json = logged_generate_json

    score_batch = backend.PrefixScorer._score_batch

    def logged_score_batch(self, batch, *args, **kwargs):
        log([f"score {row.request.key}" for row in batch])
        out = score_batch(self, batch, *args, **kwargs)
        log([f"scored {row.request.key}" for row in batch])
        return out

    backend.PrefixScorer._score_batch = logged_score_batch

    if sys.argv[1] == "train":  # torch at import: only for the stage that loads it anyway
        import pipeline.training.losses as losses

        forward = losses.GeckoLoss.forward
        steps = [0]

        def logged_forward(self, *args, **kwargs):
            steps[0] += 1
            log([f"train-step {steps[0]}"])
            return forward(self, *args, **kwargs)

        losses.GeckoLoss.forward = logged_forward


if __name__ == "__main__":
    stage = sys.argv[1]
    install(os.environ["FRET_CALL_LOG"])
    sys.argv = [f"python_steps/{stage}.py"]
    runpy.run_module(f"python_steps.{stage}", run_name="__main__", alter_sys=True)
