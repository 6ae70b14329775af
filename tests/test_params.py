"""params.yaml validation: every bad value fails before work starts, naming file, key and line."""

from pathlib import Path

import pytest

from pipeline.params import ParamsError, load_params, sql_variables


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "corpus.jsonl").write_text('{"_id": "1", "text": "a b c d e"}\n')
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_missing_sections(tmp_path):
    params = load_params(write(tmp_path, "corpus:\n  path: corpus.jsonl\n"))
    assert params.base.seed == 42
    assert params.corpus.max_words == 256


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("base:\n  seeed: 1\n", "base.seeed: unknown key", 2),
        ("base:\n  threads: -1\n", "base.threads", 2),
        ("base:\n  threads: many\n", "base.threads", 2),
        ("base:\n  device: tpu\n", "base.device", 2),
        ("corpus:\n  path: missing.jsonl\n", "corpus.path: corpus file or folder not found", 2),
        ("corpus:\n  path: corpus.jsonl\n  max_words: 3\n", "corpus.max_words", 3),
        ("corpus:\n  path: corpus.jsonl\n  on_error: ignore\n", "corpus.on_error", 3),
        ("nonsense: {}\n", "nonsense: unknown key", 1),
    ],
)
def test_bad_values_name_file_key_and_line(tmp_path, text, key, line):
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert f"{path}:{line}: {key}" in str(err.value)


def test_cross_field_rule(tmp_path):
    path = write(tmp_path, "corpus:\n  path: corpus.jsonl\n  max_words: 10\n  overlap_words: 10\n")
    with pytest.raises(ParamsError, match="overlap_words .10. must be smaller than max_words"):
        load_params(path)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "base: [\n"))
    with pytest.raises(ParamsError, match="mapping of sections"):
        load_params(write(tmp_path, "- 1\n"))


def test_sql_variables_flatten_sections(tmp_path):
    params = load_params(write(tmp_path, "base:\n  seed: 7\ncorpus:\n  path: corpus.jsonl\n"))
    variables = sql_variables(params)
    assert variables["base_seed"] == 7
    assert variables["corpus_path"] == "corpus.jsonl"


def test_repo_params_file_is_valid():
    root = Path(__file__).resolve().parents[1]
    load_params(root / "params.yaml")


def test_sql_variables_skip_values_duckdb_cannot_hold(tmp_path):
    # train.mix is a list of sources: `fret build` must not try to make it a DuckDB variable.
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t5\n")
    params = load_params(write(tmp_path, "train:\n  mix: {path: pairs.tsv, fraction: 0.2}\n"))
    variables = sql_variables(params)
    assert "train_mix" not in variables
    assert variables["generate_task_types"] == params.generate.task_types  # lists of scalars stay
    import duckdb

    con = duckdb.connect()
    for name, value in variables.items():
        con.execute(f'SET VARIABLE "{name}" = ?', [value])


def test_mix_sources_validate_again_from_their_dump(tmp_path):
    # fret_training.json keeps train as model_dump: every default written, options of other kinds included.
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t5\n")
    (tmp_path / "beir" / "qrels").mkdir(parents=True)
    (tmp_path / "beir" / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n")
    text = "train:\n  mix:\n    - {path: pairs.tsv, fraction: 0.1}\n    - {path: beir, kind: retrieval, task: Find, fraction: 0.1}\n"
    train = load_params(write(tmp_path, text)).train
    assert type(train).model_validate(train.model_dump(mode="json")) == train
    with pytest.raises(ParamsError, match="min_score applies to kind: pairs"):
        load_params(write(tmp_path, text.replace("task: Find,", "task: Find, min_score: 3,")))
