"""`camelot ask`: read a long document into memory once, then answer questions about it.

    camelot ask --model smollm2 --context-file book.txt "Who is Abraham's son?"
    camelot ask --context-file book.txt --save book.camelot -i      # interactive, memory kept
    camelot ask --load book.camelot "And his grandson?"             # no re-reading

How the conversation becomes tokens. With a chat template (the tokenizer's, unless
--no-chat-template), the document is the start of the first user message: the template is
rendered with a placeholder for the document, the text before the placeholder (fed as
scaffolding, `feed(rank=False)`: a system prompt is surprising only for lack of context, and
would take places of the reserve) and then the document are fed (streamed into memory), and
each question is the rest of the rendering. Later
turns are the difference between the rendering of the whole conversation and what was already
read, so the memory holds exactly one copy of everything, answers included (generated tokens
flow into memory like fed ones). Without a template: "<document>\\n\\nQuestion: ...\\nAnswer:".

A snapshot saved here records that bookkeeping in its metadata (`user.ask.*`), so a later
`--load` continues the same conversation format without the document.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from camelot.cli import UserError, add_memory_args, memory_config
from camelot.cli_checks import check_save_path
from camelot.generation import cut_at_stop
from camelot.options import add_model_args

DOC = "<<camelot:document>>"  # stands for the document in renderings; never tokenized
PLAIN_STOPS = ("\nQuestion:", "\n\n\n")


class AskSession:
    """A conversation about a document held in a CamelotModel's memory."""

    def __init__(self, cm, tokenizer, chat: bool = True, system: str | None = None,
                 generation: dict[str, Any] | None = None) -> None:
        self.cm = cm
        self.tok = tokenizer
        self.chat = bool(chat and getattr(tokenizer, "chat_template", None))
        self.system = system
        self.generation = dict(generation or {})
        self.messages: list[dict[str, str]] = []  # the conversation, with DOC in place of the document
        self.fed = ""  # the text the memory has read, with DOC in place of the document
        self.has_document = False
        self.tokens_read = 0  # tokens this session stepped into the model (document, prompts, answers)
        self.asked: str | None = None  # the question the memory ranks by, where it ranks by one

    # ------------------------------------------------------------------ rendering
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _bos(self) -> list[int]:
        """The BOS a tokenizer adds to a fresh sequence (plain mode; templates write their own)."""
        if self.fed or self.chat:
            return []
        ids = self.tok("a", add_special_tokens=True)["input_ids"]
        return ids[:1] if ids and ids[0] == self.tok.bos_token_id else []

    # ------------------------------------------------------------------ reading and asking
    def read(self, document: str, progress: bool = True, question: str | None = None) -> int:
        """Stream the document into memory (with the template's opening); returns tokens read.
        question: the one that will be asked, for a memory that ranks by it (read first)."""
        if self.fed:
            raise UserError("a document was already read in this session")
        if self.cm.ranks_by_question:
            if not question:
                raise UserError("this memory ranks the document by the question: give it before reading")
            self._set_question(question)
        if self.chat:
            opening = self._render([{"role": "user", "content": DOC}], False)
            head = opening[: opening.index(DOC)]
        else:
            head = ""
        opening, body = self._bos() + self._ids(head), self._ids(document)
        if opening:  # the template's: no fact to keep
            self.cm.feed(torch.tensor([opening]), progress=False, rank=False)
        self.cm.feed(torch.tensor([body]), progress=progress)
        n = len(opening) + len(body)
        self.tokens_read += n
        self.fed = head + DOC
        self.has_document = True
        return n

    def _prompt(self, question: str) -> tuple[str, list[dict[str, str]]]:
        """(text still to read before the answer, the conversation after this question)."""
        if self.chat:
            first = not self.messages
            content = f"{DOC}\n\n{question}" if first and self.has_document else question
            messages = self.messages + [{"role": "user", "content": content}]
            full = self._render(messages, True)
            if self.fed and full.startswith(self.fed):
                return full[len(self.fed):], messages
            if not self.fed:
                return full, messages
            # a template whose renderings are not prefixes of each other: fall back to a separator
            return f"\n\n{question}\n", messages
        sep = "\n\n" if self.fed else ""
        return f"{sep}Question: {question}\nAnswer:", self.messages + [{"role": "user", "content": question}]

    def ask(self, question: str) -> str:
        """Generate the answer to `question` after everything read so far; returns its text."""
        question = question.strip()
        if not question:
            raise UserError("empty question")
        delta, messages = self._prompt(question)
        ids = self._bos() + self._ids(delta)
        if self.cm.ranks_by_question:  # what is read from here on is ranked by this question
            self._set_question(question)
        kwargs = dict(self.generation)
        stops = [] if self.chat else list(PLAIN_STOPS)
        gen = self.cm.generate(torch.tensor([ids]), eos_token_id=eos_ids(self.cm.model, self.tok),
                               stop_strings=stops or None, tokenizer=self.tok, **kwargs)[0].tolist()
        raw = self.tok.decode(gen, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        eos = set(eos_ids(self.cm.model, self.tok))
        content_ids = gen[:-1] if gen and gen[-1] in eos else gen
        content = self.tok.decode(content_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.fed += delta + raw
        self.tokens_read += len(ids) + len(gen)
        self.messages = messages + [{"role": "assistant", "content": content}]
        return cut_at_stop(self.tok.decode(gen, skip_special_tokens=True), stops).strip()

    def _set_question(self, question: str) -> None:
        if question != self.asked:  # the capture is a forward of the question: not twice
            self.cm.set_question(torch.tensor([self._ids(question)]))
            self.asked = question

    # ------------------------------------------------------------------ snapshots
    def metadata(self) -> dict[str, str]:
        return {"ask.format": "chat" if self.chat else "plain", "ask.fed": self.fed,
                "ask.messages": json.dumps(self.messages), "ask.system": self.system or "",
                "ask.has_document": "1" if self.has_document else "0"}

    def resume(self, meta: dict[str, str]) -> None:
        """Continue the conversation a snapshot (saved by `camelot ask`) was in."""
        fmt = meta.get("user.ask.format")
        if fmt is None:  # a snapshot from the library: it holds a document, with no template opening
            self.chat, self.fed, self.has_document = False, DOC, True
            return
        if fmt == "chat" and not getattr(self.tok, "chat_template", None):
            raise UserError("the snapshot was read with a chat template; this tokenizer has none")
        self.chat = fmt == "chat"
        self.fed = meta.get("user.ask.fed", "")
        self.messages = json.loads(meta.get("user.ask.messages", "[]"))
        self.system = meta.get("user.ask.system") or None
        self.has_document = meta.get("user.ask.has_document") == "1"


def eos_ids(model, tok) -> list[int]:
    """End-of-turn tokens: the tokenizer's eos and the model's generation config's."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    gc = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [gc] if isinstance(gc, int) else list(gc or [])
    return sorted(set(ids))


# ---------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ask", help="read a long document into memory and answer questions about it",
        description="Stream a document far longer than the window into camelot memory, then answer "
        "questions with the wrapped model. Example: camelot ask --model smollm2 --context-file book.txt "
        "'Who is ...?'  (-i: interactive, memory kept between questions; --save/--load: snapshots)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("question", nargs="?", help="question to answer (omit with -i)")
    add_model_args(p)
    p.add_argument("--context-file", default=None,
                   help="document to read: a text file, a folder of .txt files, or builtin:genesis_kjv")
    p.add_argument("--load", default=None, help="start from a memory snapshot instead of reading a document")
    p.add_argument("--save", default=None, help="save the memory here right after reading the document")
    p.add_argument("-i", "--interactive", action="store_true", help="keep asking; memory is kept between questions")
    p.add_argument("--system", default=None, help="system prompt (chat template only)")
    p.add_argument("--no-chat-template", action="store_true", help="plain 'Question: ... Answer:' prompts")
    g = p.add_argument_group("memory")
    add_memory_args(g, window=512, slots=4096, placement="recency")
    g.add_argument("--recall-question", dest="recall", action="store_const", const="question",
                   help="camelot: CamelotConfig.recall('question'): the question is read first and the reserve "
                        "keeps the document's tokens its queries attend to most (docs/inference.md)")
    g.add_argument("--recall-question-facts", dest="recall", action="store_const", const="question+facts",
                   help="camelot: CamelotConfig.recall('question+facts'): half the reserve as --recall-question "
                        "ranks, half as --recall (the surprising tokens)")
    g.add_argument("--no-recall", dest="recall", action="store_const", const="none",
                   help="camelot: the default write (a third of the slots surprising windows, the rest evicted by "
                        "recent use, a raw tail as long as the slots) also for one question about a --context-file, "
                        "where --recall is the default; the default with -i or --save")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--sample-top-k", type=int, default=0, help="top-k of sampling (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-data-mb", type=float, default=256.0,
                   help="refuse a --context-file larger than this (MiB): a guard against reading a huge file")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    import camelot
    from camelot.options import load_model_from_args

    if not args.question and not args.interactive:
        raise UserError("give a question, or -i for interactive mode")
    if args.context_file and args.load:
        raise UserError("--context-file and --load both give the memory's content; use one")
    if args.recall in ("question", "question+facts") and not args.question:
        flag = "--recall-" + args.recall.replace("+", "-")
        raise UserError(f"{flag} ranks the document by the question: give it on the command line")
    if args.recall is None:  # one question about a document: keep its facts (docs/inference.md)
        one_shot = args.question and args.context_file and not (args.interactive or args.save)
        args.recall = "facts" if one_shot and args.strategy == "camelot" else None
    args.recall = None if args.recall == "none" else args.recall
    if args.save and not args.context_file:
        raise UserError("--save stores the memory after reading --context-file; give one (or /save in -i mode)")
    cfg = memory_config(args)
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample,
                  "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if args.sample:  # given to greedy decoding, transformers warns that they are ignored
        generation.update(temperature=args.temperature, top_p=args.top_p, top_k=args.sample_top_k)
    from camelot.generation import check_settings

    check_settings(args.max_new_tokens, args.sample, args.temperature, args.top_p, args.sample_top_k,
                   args.repetition_penalty)
    document = None
    if args.context_file:
        from camelot.documents import load_documents

        document = "\n\n".join(d.text for d in load_documents(args.context_file,
                                                                max_bytes=int(args.max_data_mb * 2**20)))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_from_args(args)
    cm = camelot.wrap(model, cfg)
    session = AskSession(cm, tok, chat=not args.no_chat_template, system=args.system, generation=generation)
    if args.load:
        session.resume(cm.memory.load(args.load))
    elif document is not None:
        n = session.read(document, progress=not args.no_progress, question=args.question)
        ranked = {"question": "by the question", "surprise": "by surprise", "attention": "by attention",
                  "question+surprise": "half by the question, half by surprise",
                  "surprise+attention": "by surprise"}[cfg.importance]
        if "surprise" in cfg.importance and cm.surprise.source != "memory":  # what the surprise is read from
            ranked += {"logit": " plus the logit memory added", "window": " without memory"}[cm.surprise.source]
        ranked = f", {cfg.span_reserve} of {cfg.slots} slots a reserve ranked {ranked}" if cfg.span_reserve else ""
        print(f"read {n} tokens into memory ({cfg.strategy}, window {cfg.window}{ranked})", file=sys.stderr)
        if args.save:
            cm.memory.save(args.save, metadata=session.metadata())
            print(f"saved memory to {args.save}", file=sys.stderr)
    if args.question:
        print(session.ask(args.question), flush=True)
    if args.interactive:
        _interactive(session)
    return 0


def _interactive(session: AskSession) -> None:
    print("ask about the document; /save PATH saves the memory, /stats shows it, /quit or Ctrl-D leaves",
          file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line.startswith("/save"):
            path = line[len("/save"):].strip()
            if not path:
                print("usage: /save PATH", file=sys.stderr)
                continue
            try:  # a bad path must not end the session (and lose the document read)
                check_save_path(path, "/save")
                session.cm.memory.save(path, metadata=session.metadata())
            except (OSError, ValueError) as e:
                print(f"not saved: {' '.join(str(e).split())}", file=sys.stderr)
                continue
            print(f"saved memory to {path}", file=sys.stderr)
            continue
        if line == "/stats":
            st = session.cm.memory.stats()
            used = sum(r.get("slots_used", 0) for r in st["layers"])
            total = sum(r.get("slots_total", 0) for r in st["layers"])
            print(f"{st['strategy']}: {used}/{total} slots used over {len(st['layers'])} layers, "
                  f"{st['open_tokens']} tokens in the open window; telemetry {st['telemetry']}", file=sys.stderr)
            continue
        print(session.ask(line), flush=True)
