"""Regenerate the bad-input table of docs/reliability.md by running the cases the tests run
(tests/reliability_cases.py: CASES), so the table says what the code does, not what it was meant
to do.

    .venv/bin/python scripts/reliability_table.py          # rewrite the table in docs/reliability.md
    .venv/bin/python scripts/reliability_table.py --check  # exit 1 if the table is stale

Only the part between the `cases:begin` / `cases:end` markers is rewritten; the rest of the page
(properties, fuzzing, determinism, soak figures) is prose kept by hand. Temporary paths are shown
as `<tmp>` and the place an error was raised by file only, so the table is stable across runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC_PATH = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- cases:begin (scripts/reliability_table.py) -->", "<!-- cases:end -->"
MAX_MESSAGE = 260

TEMPLATE = f"""# Reliability and safety

{BEGIN}
{END}
"""


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def _expected(exp) -> str:
    from tests.reliability_cases import CliRefused, Refused

    if isinstance(exp, Refused):
        return f"`{exp.error.__name__}` naming “{exp.needle}”"
    if isinstance(exp, CliRefused):
        return f"exit {exp.rc}, one line naming “{exp.needle}”"
    return "documented result"


def build_table() -> str:
    """Run every case once (fresh temporary workspace) and render the markdown table."""
    import torch

    from tests.reliability_cases import CASES, Returns, Workspace, observe

    torch.set_num_threads(1)
    rows = ["| # | Case | Expected | Observed | State unchanged | Status |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(Path(tmp))
        for i, case in enumerate(CASES, 1):
            if case.needs_cuda and not torch.cuda.is_available():
                rows.append(f"| {i} | {_cell(case.name)} | {_expected(case.expect)} | not run here (no CUDA device); "
                            f"the meta-device case above covers the same check | | skipped |")
                continue
            obs = observe(case, ws)
            msg = obs.message.replace(str(Path(tmp).resolve()), "<tmp>").replace(tmp, "<tmp>")
            if obs.outcome == "raised":
                where = obs.raised_in.rsplit(":", 1)[0] if obs.raised_in else "?"
                seen = f"`{obs.error_type}` from {where}: {msg}"
            elif obs.outcome == "exit":
                seen = f"stderr: {msg}"
            elif isinstance(case.expect, Returns):
                seen = msg
            else:
                seen = "returned normally, no error"
            kept = "" if obs.state_kept is None else ("yes" if obs.state_kept else "**no**")
            if case.xfail:
                status = f"known bug (xfail): {case.xfail}" if obs.problems else "fixed: drop the xfail mark"
            else:
                status = "pass" if not obs.problems else "**FAIL**: " + "; ".join(obs.problems)
            rows.append(f"| {i} | {_cell(case.name)} | {_expected(case.expect)} | {_cell(seen)} | {kept} | "
                        f"{_cell(status)} |")
    return "\n".join(rows)


def render(doc: str, table: str) -> str:
    if BEGIN not in doc or END not in doc:
        doc = doc.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reliability.md is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))  # tests.reliability_cases
    old = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else TEMPLATE
    new = render(old, build_table())
    if args.check:
        if new != old:
            print(f"{DOC_PATH} is stale: run scripts/reliability_table.py", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(new, encoding="utf-8")
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
