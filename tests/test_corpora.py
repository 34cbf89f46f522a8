"""The built-in python-docs corpus, split defaults per dataset, and first-position exclusion."""

from __future__ import annotations

import json
import platform

from patchscope.atlas.batching import segments
from patchscope.atlas.corpora import builtin_version, python_docs
from patchscope.atlas.sources import Document, SourceConfig, TextSource


def test_python_docs_order_is_fixed_and_prose_only():
    from pydoc_data.topics import topics

    paragraphs = python_docs()
    assert paragraphs == python_docs()  # deterministic
    assert len(paragraphs) > 500
    first_topic = sorted(topics)[0]
    assert paragraphs[0] in " ".join(topics[first_topic].split())  # topics in sorted key order
    assert all(p == p.strip() and "\n" not in p and len(p.split()) >= 3 for p in paragraphs)
    assert not any(set(p) <= set("*=-~^ ") for p in paragraphs)  # no heading underlines
    assert not any(p.startswith(">>>") for p in paragraphs)  # indented examples left out
    assert builtin_version("python-docs") == f"python {platform.python_version()}"


def test_python_docs_slices_keep_absolute_indices():
    everything = python_docs()
    docs = list(TextSource(SourceConfig("python-docs", "[10:20]")))
    assert [d.index for d in docs] == list(range(10, 20))
    assert [d.text for d in docs] == everything[10:20]
    assert TextSource(SourceConfig("python-docs", "[10:20]")).fetch([12, 19]) == {12: everything[12], 19: everything[19]}


def test_split_defaults_to_every_row_except_for_the_original_dataset(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(300)))
    source = TextSource(SourceConfig(str(path)))
    assert [d.index for d in source] == list(range(300))
    assert source.rows_read == (0, 299)
    assert SourceConfig("NeelNanda/pile-10k").resolved_split == "train[100:250]"
    assert SourceConfig("NeelNanda/pile-10k", "train[0:5]").resolved_split == "train[0:5]"
    assert SourceConfig("some/other-dataset").resolved_split == ""
    assert len(list(TextSource(SourceConfig("python-docs")))) == len(python_docs())


class _NoBosTokenizer:
    """Whitespace tokenizer without BOS, like SmolLM2's."""

    bos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = [len(word) for word in text.split()]

        return Out()


def test_first_position_is_excluded_without_bos_too():
    doc = Document(7, " ".join(["word"] * 10))
    [whole] = segments(_NoBosTokenizer(), doc, 16, "truncate", exclude_bos=True, has_bos=False)
    assert whole.first_counted == 1
    [kept] = segments(_NoBosTokenizer(), doc, 16, "truncate", exclude_bos=False, has_bos=False)
    assert kept.first_counted == 0
    windows = segments(_NoBosTokenizer(), doc, 4, "window", exclude_bos=True, has_bos=False)
    assert [(w.offset, w.first_counted) for w in windows] == [(0, 1), (4, 1), (8, 1)]  # each window starts cold


def test_corpus_mean_leaves_first_positions_out_even_when_profiled_with_them(gemma, tmp_path):
    import torch

    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile

    model, tokenizer = gemma
    path = tmp_path / "corpus.txt"
    path.write_text(
        "The quick brown fox jumps over the lazy dog.\nRain fell on the mountains.\nIn 1994 the committee met 3 times.\n"
    )
    source = TextSource(SourceConfig(str(path)))
    site = "blocks.1.hook_resid_pre"
    atlas = profile(
        model, tokenizer, source, ProfileConfig(sites=(site,), exclude_bos=False, max_length=8, overflow="window"), progress=False
    )
    vectors = []
    for line in path.read_text().splitlines():  # brute force: every window, its first slot left out
        ids = tokenizer(line).input_ids
        windows = [ids[:8]] + [[ids[0], *ids[1:][i : i + 7]] for i in range(7, len(ids) - 1, 7)]
        for window in windows:
            with torch.no_grad():
                hidden = model(torch.tensor([window]), output_hidden_states=True).hidden_states[1]
            vectors.append(hidden[0, 1:])
    expected = torch.cat(vectors).mean(0)
    torch.testing.assert_close(atlas.mean_without_first_slots(site, model, tokenizer), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(atlas[site].mean.float(), expected, rtol=1e-4, atol=1e-5)  # the atlas itself counts BOS


def test_profile_command_without_split_reads_every_row(gemma_dir, tmp_path, capsys):
    from patchscope.cli.main import main

    path = tmp_path / "mine.jsonl"
    texts = ["The quick brown fox jumps.", "Rain fell on the hills.", "", "Markets rallied today."] * 60  # 240 rows
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "atlas"
    assert (
        main(
            [
                "profile",
                "--model",
                str(gemma_dir),
                "--device",
                "cpu",
                "--layer",
                "1",
                "--max-length",
                "8",
                "--dataset",
                str(path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "profiled 180 documents (60 empty skipped; rows 0-239 of" in printed
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["split"] == "" and meta["n_documents"] == 180 and meta["has_bos"] is True
