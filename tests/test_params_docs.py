"""The parameters' one source: descriptions in the code, docs/params.md generated from them, code
defaults equal to the shipped params.yaml (or named in GECKO)."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.params import Params, load_params
from pipeline.params.docs import describe, differing_defaults, markdown, param_keys
from pipeline.params.gecko import GECKO

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "fret params --markdown > docs/params.md"


def shipped() -> Params:
    return load_params(ROOT / "params.yaml")


def test_every_key_has_a_description():
    missing = [key.path for key in param_keys() if not key.description.strip()]
    assert missing == [], f"give these fields Field(..., description=...) (sections: a docstring): {missing}"


def test_keys_walk_nested_sections_lists_and_sets():
    keys = {key.path: key for key in param_keys()}
    assert keys["neighbors.ivf"].section and keys["neighbors.ivf.nprobe"].default == 32
    assert keys["select.weights"].type == "mapping | judge" and keys["select.weights.rc"].default == 1.0
    assert keys["train.mix[].path"].required and keys["train.mix[].kind"].type == "pairs | classification | retrieval"
    assert keys["eval.retrieval.<name>.holdout"].type == "float, >= 0, < 1"
    assert keys["base.threads"].type == "int, >= 1, <= 512" and keys["llm.device"].type == "auto | cpu | cuda | null"


def test_docs_params_md_is_what_the_code_generates():
    written = (ROOT / "docs" / "params.md").read_text(encoding="utf-8")
    assert written == markdown(shipped()), f"docs/params.md is stale: regenerate it with `{REGENERATE}`"


def test_markdown_names_a_value_that_differs_from_the_default(tmp_path):
    (tmp_path / "params.yaml").write_text("neighbors:\n  ivf:\n    nprobe: 7\n")
    params = load_params(tmp_path / "params.yaml")
    assert differing_defaults(params) == {"neighbors.ivf.nprobe": (32, 7)}
    rows = {line.split(" | ")[0]: line for line in markdown(params).splitlines() if line.startswith("| `")}
    assert rows["| `neighbors.ivf.nprobe`"].endswith("**params.yaml ships `7`** |")
    assert "qrels/&lt;split>.tsv" in rows["| `eval.retrieval`"]  # not an HTML tag outside code spans


def test_describe_prints_values_defaults_and_descriptions(tmp_path):
    (tmp_path / "params.yaml").write_text("neighbors:\n  top_n: 7\nselect:\n  weights: judge\n")
    text = describe(load_params(tmp_path / "params.yaml"))
    assert f"neighbors.top_n: 7  (code default: {Params().neighbors.top_n})\n    Candidates mined per query" in text
    assert "select.weights: judge  (code default: {ql: " in text
    assert "select.weights.ql  (default: 1.0)" in text  # no value of its own while weights is `judge`
    assert "train.mix[].path  (required)\n    The source:" in text
    assert "\n[neighbors.ivf]\n    FAISS IndexIVFFlat" in text


def test_fret_params_modes(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: 3\n")
    runner = CliRunner()
    described = runner.invoke(main, ["params", "--params", str(path)])
    assert described.exit_code == 0 and "base.seed: 3  (code default: 42)\n    Every random choice" in described.output
    values = runner.invoke(main, ["params", "--params", str(path), "--values"])
    assert yaml.safe_load(values.output) == load_params(path).model_dump(mode="json")
    docs = runner.invoke(main, ["params", "--params", str(path), "--markdown"])
    assert docs.output == markdown(load_params(path))
    bad = runner.invoke(main, ["params", "--params", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "params file not found" in bad.output


def test_code_defaults_equal_params_yaml_or_are_named_in_gecko():
    differing = differing_defaults(shipped())
    unnamed = {key: f"code {code!r}, params.yaml {ours!r}" for key, (code, ours) in differing.items()}
    unnamed = {key: text for key, text in unnamed.items() if key not in GECKO}
    assert not unnamed, f"code defaults unlike params.yaml (make them equal, or name them in GECKO): {unnamed}"
    stale = sorted(set(GECKO) - set(differing))
    assert not stale, f"GECKO names keys whose code default equals params.yaml's value: {stale}"


def test_gecko_values_are_the_code_defaults():
    for key, setting in GECKO.items():
        value = Params().model_dump(mode="json")
        for part in key.split("."):
            value = value[part]
        assert value == setting.value, key


def test_params_yaml_comments_are_one_line_per_key():
    lines = (ROOT / "params.yaml").read_text(encoding="utf-8").splitlines()
    first_key = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    blocks = [i + 1 for i, line in enumerate(lines) if i > first_key and line.lstrip().startswith("#")]
    assert blocks == [], f"params.yaml lines {blocks}: comment blocks belong in the field's description"


def test_params_yaml_values_read_only_what_a_clone_has():
    # Only data/sample travels into the tests' scratch repositories, and nothing reads ../shared any more.
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    values = strings(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    assert [v for v in values if "data/eval" in v or "../shared" in v] == []
