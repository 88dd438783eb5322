"""Quality metrics against the unquantized model (KL, top-1, BLEU), eval domains, and the
built-in texts: calibration is mixed-domain, shares no passage with the eval texts, and every
shipped text has its terms recorded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from qpipe.corpora.calibration import BUILTIN, load_calib_texts, validate_calib
from qpipe.errors import ConfigError
from qpipe.evaluation.quality import bleu, eval_domains, measure, topk_kl, validate_eval_texts
from qpipe.store.paths import data_file
from tests.conftest import save_random_llama

DATA = data_file("")
VOCAB = 512


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_random_llama(
        tmp_path_factory.mktemp("tiny"),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )


def _load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(n: int = 300) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1))


def test_a_model_against_itself_has_zero_kl_and_full_top1_agreement(tiny) -> None:
    model, ids = _load(tiny), _ids()
    base = measure(model, ids, 128, "cpu", keep_top_k=16)
    same = measure(_load(tiny), ids, 128, "cpu", reference=base.reference())
    assert same.tokens == base.tokens == 297  # windows of 128 tokens: 127 + 127 + 43
    assert same.kld_sum / same.tokens == pytest.approx(0.0, abs=1e-7)
    assert same.top1_hits == same.tokens
    assert same.ppl == pytest.approx(base.ppl, rel=1e-6)

    noisy = _load(tiny)
    with torch.no_grad():
        for p in noisy.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.2 * p.std())
    other = measure(noisy, ids, 128, "cpu", reference=base.reference())
    assert other.kld_sum / other.tokens > 1e-6  # random weights: near-uniform outputs
    assert other.top1_hits < other.tokens


def test_topk_kl_is_the_full_kl_with_the_whole_vocabulary_and_a_lower_bound_below() -> None:
    gen = torch.Generator().manual_seed(0)
    p = F.log_softmax(torch.randn(50, VOCAB, generator=gen) * 3, -1)
    q = F.log_softmax(torch.randn(50, VOCAB, generator=gen) * 3, -1)
    full = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    everything = p.topk(VOCAB, -1)
    assert torch.allclose(topk_kl(q, everything.values, everything.indices), full, atol=1e-4)
    top8 = p.topk(8, -1)
    coarse = topk_kl(q, top8.values, top8.indices)
    assert (coarse >= -1e-6).all() and (coarse <= full + 1e-5).all()
    assert coarse.sum() > 0.5 * full.sum()  # peaked distributions: the top 8 carry most of it


def test_bleu_is_100_for_identical_text_and_lower_otherwise() -> None:
    refs = ["the quick brown fox jumps over the lazy dog", "a second, longer sentence here"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["the quick brown cat sat on the lazy mat", refs[1]], refs) < 100.0


def test_eval_domains_first_is_the_main_text_and_names_are_checked() -> None:
    ev = {"text": "eval_gpl3.txt", "name": "gpl3", "extra_texts": {"pydocs": "eval_pydocs.txt"}}
    assert eval_domains(ev) == [("gpl3", "eval_gpl3.txt"), ("pydocs", "eval_pydocs.txt")]
    validate_eval_texts(ev)
    with pytest.raises(ConfigError, match="names repeat"):
        eval_domains({**ev, "extra_texts": {"gpl3": "eval_pydocs.txt"}})
    with pytest.raises(ConfigError, match="'py docs' is not valid"):
        eval_domains({**ev, "extra_texts": {"py docs": "eval_pydocs.txt"}})
    with pytest.raises(ConfigError, match="missing.txt"):
        validate_eval_texts({**ev, "extra_texts": {"x": "missing.txt"}})


# -- calibration data ------------------------------------------------------------------------


def test_builtin_calibration_set_is_mixed_domain() -> None:
    texts = load_calib_texts({"dataset": None, "num_samples": 8, "seq_len": 128})
    names = sorted(p.stem for p in (DATA / BUILTIN).glob("*.txt"))
    assert names == ["code_comments", "legal", "prose", "tech_docs"]
    assert len(texts) == 4
    sizes = [len(t) for t in texts]
    assert max(sizes) < 1.5 * min(sizes)  # balanced: evenly spread windows sample each domain


def test_calibration_from_a_local_file_folder_or_jsonl(tmp_path) -> None:
    base = {"num_samples": 4, "seq_len": 64, "text_column": "text"}
    (tmp_path / "a.txt").write_text("first text")
    (tmp_path / "b.md").write_text("second text")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert load_calib_texts({**base, "dataset": str(tmp_path)}) == ["first text", "second text"]
    assert load_calib_texts({**base, "dataset": str(tmp_path / "a.txt")}) == ["first text"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_calib_texts({**base, "dataset": str(rows)}) == ["row one", "two"]

    rows.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ConfigError, match=r"rows.jsonl:1 has no text field .*found: body"):
        load_calib_texts({**base, "dataset": str(rows)})
    with pytest.raises(ConfigError, match="does not exist"):
        validate_calib({**base, "dataset": str(tmp_path / "nope.jsonl")})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="folder with no"):
        validate_calib({**base, "dataset": str(empty)})


# -- the shipped texts -----------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _longest_shared_run(a: str, b: str, n: int = 8) -> int:
    """Longest run of words that ``a`` and ``b`` share (0 when no ``n`` words are shared)."""
    wa, wb = _words(a), _words(b)
    starts: dict[tuple[str, ...], list[int]] = {}
    for j in range(len(wb) - n + 1):
        starts.setdefault(tuple(wb[j : j + n]), []).append(j)
    best = 0
    for i in range(len(wa) - n + 1):
        for j in starts.get(tuple(wa[i : i + n]), []):
            k = n
            while i + k < len(wa) and j + k < len(wb) and wa[i + k] == wb[j + k]:
                k += 1
            best = max(best, k)
    return best


def test_calibration_shares_no_passage_with_any_eval_text() -> None:
    """Legal English repeats its boilerplate (\"the implied warranties of merchantability\"),
    so a short shared phrase is allowed; a shared sentence or passage is not. The old
    calibration text (calib=licenses) fails this: it holds GPL-2, much of which GPL-3 repeats."""
    evals = [data_file("eval_gpl3.txt").read_text(), data_file("eval_pydocs.txt").read_text()]
    for path in sorted((DATA / BUILTIN).glob("*.txt")):
        for ev in evals:
            assert _longest_shared_run(path.read_text(), ev) < 16, path.name
    assert _longest_shared_run(data_file("calib_licenses.txt").read_text(), evals[0]) > 100


def test_every_shipped_text_has_its_source_and_terms_in_the_data_readme() -> None:
    readme = (DATA / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    shipped = sorted(
        str(p.relative_to(DATA)) for p in DATA.rglob("*.txt") if p.parent.name != "__pycache__"
    )
    assert shipped and sorted(rows) == shipped
    for name, (_, what, source, terms) in ((n, r[:4]) for n, r in rows.items()):
        assert what and source and len(terms) > 20, name
        assert any(
            word in terms.lower()
            for word in ("public domain", "license", "permitted", "cc0", "psf")
        ), name
    assert "Python Software Foundation License" in readme  # the PSF terms for stdlib text


def test_report_adds_the_other_domains_and_the_agreement_columns() -> None:
    from qpipe.report import columns, markdown

    run = {
        "status": "FINISHED",
        "metrics.quality.ppl": 21.5,
        "metrics.quality.ppl.gpl3": 21.5,
        "metrics.quality.ppl.pydocs": 17.25,
        "metrics.quality.ppl_delta_pct.pydocs": 3.5,
        "metrics.quality.kld": 0.0123,
    }
    labels = [label for _, label in columns([run])]
    assert "ppl pydocs" in labels and "ppl gpl3" not in labels  # gpl3 is quality.ppl itself
    assert labels.index("ppl pydocs") == labels.index("ppl Δ%") + 1
    assert {"KL", "top-1", "BLEU"} <= set(labels)
    assert "| 17.25 | 3.5 |" in markdown([run]) and "0.0123" in markdown([run])
