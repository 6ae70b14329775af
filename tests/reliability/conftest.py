"""Shared pieces of the reliability suite: tiny models, tiny projects, stage subprocesses, table hashes.

A "project" here is a scratch folder laid out like the repository: `params.yaml` pointing at the
tiny models, `prompts/`, and hand-made upstream stage files under `warehouse/`. Stages run in it as
real subprocesses, exactly as DVC runs them (`python -m python_steps.<stage>`), optionally through
`callhook.py`, which logs every LLM call so that a test can tell which calls a resumed run repeats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:  # the shared fixtures live in tests/
    sys.path.insert(0, str(TESTS))

from fixtures_encoder import tiny_bert_dir  # noqa: E402,F401  (session fixture, re-exported)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TASK = "Given a question, retrieve passages that answer the question"
TOPICS = ["bees", "rivers", "glaciers", "vaccines", "proteins", "volcanoes", "comets", "tides", "forests", "deserts"]


# --- tiny models ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rel_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 with a ChatML template and a BPE trained on fret's own prompts, so that
    both LLM stages work with it: JSON generation (queries) and single-token yes/no (llm_scores)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("rel_gpt2")
    texts = [(REPO / "prompts" / name).read_text() for name in ("generate.jinja", "score.jinja")]
    texts += ["Yes No yes no\nYes. No.", '{"task": "Given a question", "query": "what"}'] * 10
    texts += [f"{t} carry sediment and water" for t in TOPICS]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 3, vocab_size=500, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=4096,
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=4096, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


# --- projects -------------------------------------------------------------------------------------


def params_yaml(llm_dir: Path, bert_dir: Path, seed: int = 42, **sections: str) -> str:
    """A params.yaml for the tiny models; `sections` replace whole sections (as YAML flow mappings)."""
    base = {
        "base": f"{{seed: {seed}, threads: 1, device: cpu}}",
        "llm": f"{{model: '{llm_dir}', dtype: float32, cache_path: cache/llm.duckdb}}",
        # Long outputs on purpose: a random model writes to the schema's length limits, so each
        # batch takes long enough for a kill to land inside generation.
        "generate": "{limit: 6, max_new_tokens: 200, batch_size: 2, max_passage_words: 30, max_retries: 1, "
        "max_failure_rate: 1.0}",
        "score": "{batch_size: 3, max_passage_tokens: 48}",
        "encoder": f"{{model: '{bert_dir}', cache_path: null}}",
        # A checkpoint every 10 of the 80 steps: a killed run resumes (kills land between checkpoints too).
        "train": "{batch_size: 4, max_steps: 80, warmup_ratio: 0.1, mrl_dims: [16, 8], lr: 1.0e-3, checkpoint_every: 10, "
        "mix: null, control: false}",
    }
    base.update(sections)
    return "".join(f"{k}: {v}\n" for k, v in base.items())


def passages_table(n: int = 10):
    import pyarrow as pa

    rows = [
        {"passage_id": f"d{i:02d}#0", "doc_id": f"d{i:02d}", "title": f"On {TOPICS[i % len(TOPICS)]}",
         "text": f"Passage {i}: {TOPICS[i % len(TOPICS)]} carry sediment and water {i} times a year, "
                 f"which shapes the land around {TOPICS[(i + 3) % len(TOPICS)]}.",
         "n_words": 16, "source": f"corpus.jsonl:{i + 1}"}
        for i in range(n)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)


def queries_table(n: int = 10):
    import pyarrow as pa

    rows = [
        {"query_id": f"q{i:02d}", "passage_id": f"d{i:02d}#0", "query_index": 0, "task_type": "question answering",
         "task": TASK, "query": f"what do {TOPICS[i % len(TOPICS)]} carry {i}", "llm": "tiny", "prompt_hash": "h"}
        for i in range(n)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)


def neighbors_table(n_queries: int = 10, n_passages: int = 10, top_n: int = 6):
    import pyarrow as pa

    rows = [
        {"query_id": f"q{q:02d}", "passage_id": f"d{(q + k) % n_passages:02d}#0", "knn_rank": k + 1,
         "knn_score": 1.0 - k / 10, "bm25_rank": top_n - k, "bm25_score": float(k), "mined_by": "knn"}
        for q in range(n_queries) for k in range(top_n)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)


def triples_table(n: int = 24):
    import pyarrow as pa

    rows = []
    for i in range(n):
        topic, other = TOPICS[i % len(TOPICS)], TOPICS[(i + 3) % len(TOPICS)]
        negative = (None, None, None) if i % 7 == 3 else (f"d{i + 100}", "", f"a note on {other} {i}")
        rows.append(dict(zip(
            ["query_id", "task", "query", "task_type", "positive_id", "positive_title", "positive_text",
             "negative_id", "negative_title", "negative_text", "seed_id"],
            [f"q{i:02d}", TASK, f"what about {topic} {i}?", "question answering", f"d{i}", f"On {topic}",
             f"{topic} {i} are described in this passage.", *negative, f"d{i}"],
        )))  # fmt: skip
    return pa.Table.from_pylist(rows)


def make_project(root: Path, llm_dir: Path, bert_dir: Path, seed: int = 42, **sections: str) -> Path:
    """params.yaml, prompts/ and the upstream stage files every tested stage reads."""
    from pipeline.warehouse import write_stage, write_table

    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(params_yaml(llm_dir, bert_dir, seed, **sections))
    shutil.copytree(REPO / "prompts", root / "prompts")  # scoring reads prompts/ relative to the cwd
    wh = root / "warehouse"
    for stage, tables, upstream in [
        ("passages", {"passages": passages_table()}, []),
        ("queries", {"queries": queries_table()}, ["passages"]),
        ("neighbors", {"neighbors": neighbors_table()}, ["passages", "queries"]),
        ("triples", {"triples": triples_table()}, []),
    ]:
        with write_stage(stage, upstream=upstream, warehouse=wh) as con:
            for name, table in tables.items():
                write_table(con, name, table)
    return root


# --- running stages -------------------------------------------------------------------------------


def stage_env(log: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if log is not None:
        env["FRET_CALL_LOG"] = str(log)
    return env


def stage_command(stage: str, hooked: bool) -> list[str]:
    """`python -m python_steps.<stage>`; hooked: the same module run through callhook (runpy, as -m does)."""
    if hooked:
        return [sys.executable, "-m", "callhook", stage]
    return [sys.executable, "-m", f"python_steps.{stage}"]


@dataclass
class Run:
    returncode: int
    killed: bool
    seconds: float
    marker_seconds: float | None  # when the first unit of work started (from the call log), if it did
    output: str
    pid: int = 0


def run_stage(project: Path, stage: str, *, log: Path | None = None, timeout: float = 240) -> Run:
    """Run a stage to completion (hooked when `log` is given)."""
    started = time.monotonic()
    proc = subprocess.run(stage_command(stage, log is not None), cwd=project, env=stage_env(log),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    seconds = time.monotonic() - started
    return Run(proc.returncode, False, seconds, None, proc.stdout + proc.stderr, 0)


def first_work_line(log: Path, stage: str, marker: str | None = None) -> bool:
    marker = marker or {"queries": "generate ", "llm_scores": "score ", "train": "train-step "}[stage]
    try:
        return marker.encode() in log.read_bytes()
    except FileNotFoundError:
        return False


def run_and_kill(
    project: Path, stage: str, log: Path, delay: float, after_marker: bool, timeout: float = 240, marker: str | None = None
) -> Run:  # fmt: skip
    """Start the hooked stage; SIGKILL it `delay` s after it starts working (or after it starts).

    `marker`: a log line (start) to wait for instead of the first unit of work, e.g. `train-step 25\n`.
    If the stage finishes first, it simply finishes (`killed` False)."""
    started = time.monotonic()
    out = (log.parent / f"{log.name}.out").open("w+")
    proc = subprocess.Popen(stage_command(stage, True), cwd=project, env=stage_env(log), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    marker_at = None
    try:
        if after_marker:
            while proc.poll() is None and not first_work_line(log, stage, marker):
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"{stage}: no work started in {timeout} s")
                time.sleep(0.01)
            marker_at = time.monotonic() - started
        deadline = time.monotonic() + delay
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    out.seek(0)
    text = out.read()
    out.close()
    return Run(proc.returncode, killed, time.monotonic() - started, marker_at, text, proc.pid)


def read_log(log: Path) -> list[tuple[str, ...]]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    # A line cut by the kill (no newline yet) cannot be told apart from a whole one: keep it anyway,
    # a call that had started counts as made.
    return [tuple(line.split(" ")) for line in lines if line]


# --- comparing outputs ----------------------------------------------------------------------------


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest)."""
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def table_digest(db: Path, table: str, exclude: tuple[str, ...] = ()) -> tuple[int, str]:
    """(rows, sha256 over the sorted rows' canonical JSON), `exclude` columns left out."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        cols = [r[0] for r in con.execute(f'DESCRIBE "{table}"').fetchall() if r[0] not in exclude]
        rows = con.execute(f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{table}"').fetchall()
    finally:
        con.close()
    lines = sorted(json.dumps([cols, list(r)], default=repr, ensure_ascii=False) for r in rows)
    return len(rows), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def stage_tables(db: Path) -> list[str]:
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall()]
    finally:
        con.close()


# Only `queries.created_at` depends on the clock (when the LLM call finished, read from the cache):
# it is the one column left out when a resumed run is compared with an uninterrupted one.
TIME_COLUMNS = {"queries": ("created_at",)}


def stage_digest(db: Path) -> dict[str, tuple[int, str]]:
    return {t: table_digest(db, t, TIME_COLUMNS.get(t, ())) for t in stage_tables(db)}


def model_digest(folder: Path) -> dict[str, str]:
    """The trained weights, tensor by tensor, plus every saved file except the timing-bearing ones."""
    from safetensors.numpy import load_file

    out = {}
    for name, array in sorted(load_file(str(folder / "model.safetensors")).items()):
        out[f"tensor:{name}"] = hashlib.sha256(array.tobytes() + str(array.dtype).encode()).hexdigest()
    config = json.loads((folder / "fret_training.json").read_text())
    for key in ("seconds", "examples_per_s"):  # wall-clock measurements
        config["result"].pop(key)
    out["fret_training.json"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    for rel, digest in file_digests(folder).items():
        if rel not in ("model.safetensors", "fret_training.json", "README.md"):  # the card prints the timing
            out[rel] = digest
    return out


def dvclive_losses(project: Path) -> list[tuple[str, str]]:
    """(step, loss) rows of dvclive's loss plot (its timestamp column left out)."""
    path = project / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    return [tuple(line.split("\t")[:2]) for line in path.read_text().splitlines()]


def outputs_digest(project: Path, stage: str) -> dict:
    """What a stage produced, clock-dependent values left out (see TIME_COLUMNS, model_digest)."""
    if stage == "train":
        return {"model": model_digest(project / "models" / "fret-encoder"), "losses": dvclive_losses(project)}
    return stage_digest(project / "warehouse" / f"{stage}.duckdb")


# The function doing each stage's expensive work (module, attribute), timed in reference runs.
WORK = {"queries": ("python_steps.queries", "generate_queries"), "neighbors": ("python_steps.neighbors", "mine_neighbors"),
        "llm_scores": ("pipeline.llm.scoring", "score_relevance"), "train": ("pipeline.training.loop", "train")}  # fmt: skip


def run_in_process(project: Path, stage: str) -> float:
    """The stage's `main()` in this process (torch is imported once for the whole suite); returns
    the seconds its expensive work took (LLM calls, training), what kill delays are drawn over."""
    import importlib

    module = importlib.import_module(f"python_steps.{stage}")
    owner = importlib.import_module(WORK[stage][0])
    work = getattr(owner, WORK[stage][1])
    seconds = []

    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return work(*args, **kwargs)
        finally:
            seconds.append(time.monotonic() - started)

    cwd = os.getcwd()
    os.chdir(project)
    setattr(owner, WORK[stage][1], timed)
    try:
        module.main()
    except SystemExit as err:  # a stage reports its errors this way
        pytest.fail(f"{stage} failed: {err}")
    finally:
        setattr(owner, WORK[stage][1], work)
        os.chdir(cwd)
    assert seconds, f"{stage}: {WORK[stage]} never ran"
    return sum(seconds)


@dataclass
class Reference:
    project: Path
    digest: dict
    seconds: float  # of the stage's expensive work (see WORK)


@pytest.fixture(scope="session")
def reference(rel_llm_dir, tiny_bert_dir, tmp_path_factory):
    """`reference(stage, seed=42, run=0)`: an uninterrupted from-scratch run of the stage (built once)."""
    done: dict[tuple, Reference] = {}

    def get(stage: str, seed: int = 42, run: int = 0) -> Reference:
        key = (stage, seed, run)
        if key not in done:
            project = make_project(tmp_path_factory.mktemp(f"ref_{stage}_{seed}_{run}"), rel_llm_dir, tiny_bert_dir, seed)
            seconds = run_in_process(project, stage)
            done[key] = Reference(project, outputs_digest(project, stage), seconds)
        return done[key]

    return get
