"""`camelot ask` and `camelot inspect` end to end on a tiny random llama saved with a tiny
byte-level BPE tokenizer (chat template included), so the CLI runs as a user runs it, offline."""

from __future__ import annotations

import io
import json

import pytest
import torch

import camelot
from camelot import CamelotConfig
from camelot.ask import DOC, AskSession
from camelot.cli import main
from tests.conftest import bare, tiny_llama

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
TEXT = ("In the beginning God created the heaven and the earth. And the earth was without form, and void. "
        "The pass key is 71432. Remember it. What is the pass key? The grass is green. The sky is blue. ") * 4


def tiny_tokenizer(chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def tiny_model_folder(path, chat_template: str | None = CHATML, max_pos: int = 4096):
    """A folder `camelot --model PATH` loads: tiny llama + tiny tokenizer."""
    tok = tiny_tokenizer(chat_template)
    model = tiny_llama(vocab=len(tok), max_pos=max_pos)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(TEXT * 3)
    return p


ARGS = ["--window", "32", "--slots", "64", "--read-top-k", "4", "--max-new-tokens", "12", "--no-progress",
        "--repetition-penalty", "1.0"]


def _answer(capsys) -> str:
    """What `ask` printed: the answer (a random tiny model's answer may hold newlines)."""
    return capsys.readouterr().out


def test_ask_save_load_answers_the_same(folder, book, tmp_path, capsys):
    snap = tmp_path / "book.camelot"
    assert main(["ask", "--model", str(folder), "--context-file", str(book), "--save", str(snap), *ARGS,
                 "What is the pass key?"]) == 0
    first = _answer(capsys)
    assert first.endswith("\n") and snap.exists()
    assert main(["ask", "--model", str(folder), "--load", str(snap), *ARGS, "What is the pass key?"]) == 0
    assert _answer(capsys) == first


def test_session_memory_holds_one_copy_of_the_conversation(folder):
    """What the memory has read equals the chat template's rendering of the whole conversation
    (document in place), so later turns never re-read or skip anything."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    cm = camelot.wrap(model, bare(window=32, slots=64, read_top_k=4))
    session = AskSession(cm, tok, generation={"max_new_tokens": 6})
    n_doc = session.read(TEXT, progress=False)
    for q in ("What is the pass key?", "And the sky?"):
        session.ask(q)
    rendered = tok.apply_chat_template(session.messages, tokenize=False)
    assert session.fed.startswith("<|im_start|>user\n" + DOC) and rendered.startswith(session.fed)
    # only the closing of the last turn is unread (its eos too when the answer hit max_new_tokens)
    assert rendered[len(session.fed):] in ("\n", "<|im_end|>\n")
    read = sum(cm.memory.telemetry().values()) // (2 * 2) + cm.open_len  # memory counts per layer and KV head
    assert n_doc < read == session.tokens_read
    at_once = len(tok(session.fed.replace(DOC, TEXT), add_special_tokens=False).input_ids)
    assert abs(read - at_once) <= 0.03 * at_once  # pieces tokenised apart may merge a little differently


def test_interactive_mode_keeps_memory_between_questions(folder, book, tmp_path, capsys, monkeypatch):
    snap = tmp_path / "after.camelot"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"What is the pass key?\n\n/stats\n/save {snap}\nAnd the sky?\n"))
    assert main(["ask", "--model", str(folder), "--context-file", str(book), "-i", *ARGS]) == 0
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.startswith("> ") or line.strip()]) >= 2
    assert "slots used" in captured.err and snap.exists()
    meta = camelot.snapshot.read_metadata(snap)
    assert [m["role"] for m in json.loads(meta["user.ask.messages"])] == ["user", "assistant"]


def test_plain_prompts_without_a_chat_template(tmp_path, book, capsys):
    folder = tiny_model_folder(tmp_path / "plain", chat_template=None)
    assert main(["ask", "--model", str(folder), "--context-file", str(book), *ARGS, "Who?"]) == 0
    assert _answer(capsys).endswith("\n")  # one answer (possibly empty), printed


@pytest.mark.parametrize("argv, needle", [
    (["ask"], "give a question"),
    (["ask", "--context-file", "a.txt", "--load", "b.camelot", "q"], "use one"),
    (["ask", "--save", "x.camelot", "q"], "--save stores"),
    (["ask", "--window", "0", "q"], "window"),
    (["ask", "--max-new-tokens", "-1", "q"], "max_new_tokens"),
    (["ask", "--context-file", "/nonexistent/book.txt", "q"], "not found"),
    (["inspect", "/nonexistent.camelot"], "no such snapshot"),
])
def test_user_errors_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_inspect_names_the_reserve_and_the_saved_question(folder, book, tmp_path, capsys):
    snap = tmp_path / "asked.camelot"
    assert main(["ask", "--model", str(folder), "--context-file", str(book), "--save", str(snap), *ARGS,
                 "--recall-question", "Who?"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(snap), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "ranked by question (span_score=scan" in out
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(folder)("Who?", add_special_tokens=False)["input_ids"])
    assert f"the question it ranks by is saved ({n} tokens)" in out


def test_inspect_prints_stats_and_plots(folder, book, tmp_path, capsys):
    snap = tmp_path / "book.camelot"
    main(["ask", "--model", str(folder), "--context-file", str(book), "--save", str(snap), *ARGS, "Who?"])
    capsys.readouterr()
    assert main(["inspect", str(snap), "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "model: llama, 2 layers, 4 heads / 2 KV heads of dim 16" in out and "| layer | slots used" in out
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(snap), "--json", "--no-plot"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["stats"]["layers"]
    assert [r["layer"] for r in rows] == [0, 1] and all(0 < r["slots_used"] <= 128 for r in rows)
    assert all(sum(n for _, n in r["count_hist"]) == r["slots_used"] for r in rows)
    # the same numbers as the live wrapper's stats after loading
    from transformers import AutoModelForCausalLM

    cm = camelot.wrap(AutoModelForCausalLM.from_pretrained(folder), CamelotConfig(window=32, slots=64, read_top_k=4))
    cm.memory.load(snap)
    live = cm.memory.stats()["layers"]
    assert [r["count_hist"] for r in live] == [r["count_hist"] for r in rows]
    assert torch.is_tensor(cm.runtimes[0].state.memory.keys)
