"""Write the JSONL data of megapack's two shipped lm-eval tasks (megapack/evaluation/tasks/), deterministically.

    python tools/make_eval_tasks.py [--out megapack/evaluation/tasks]

- arithmetic (`megapack_arithmetic`, generate_until, exact match): "What is 17 + 25?" -> "42"; a few-shot pool
  and a test split drawn without overlap from one seeded stream.
- capitals (`megapack_capitals`, multiple choice by loglikelihood): "What is the capital of France?" with four
  capitals to choose from (the right one and three others, in a seeded order).
Rerunning writes the same bytes (tests/test_eval.py checks the committed files against it).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261203
ARITHMETIC_FEWSHOT, ARITHMETIC_TEST = 10, 100
CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Australia", "Canberra"),
    ("Greece", "Athens"), ("Turkey", "Ankara"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Switzerland", "Bern"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"),
    ("Indonesia", "Jakarta"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Cuba", "Havana"), ("Ukraine", "Kyiv"),
    ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Philippines", "Manila"), ("Pakistan", "Islamabad"), ("New Zealand", "Wellington"),
)


def arithmetic(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(few-shot pool, test) of distinct "What is a + b?" / "What is a - b?" questions with two-digit operands."""
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < ARITHMETIC_FEWSHOT + ARITHMETIC_TEST:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        question = f"What is {a} {op} {b}?"
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(a + b if op == "+" else a - b)})
    return rows[:ARITHMETIC_FEWSHOT], rows[ARITHMETIC_FEWSHOT:]


def capitals(rng: random.Random) -> list[dict]:
    """One four-way question per country: the right capital and three others, shuffled; `answer` is its index."""
    names = [c for _, c in CAPITALS]
    rows = []
    for country, capital in CAPITALS:
        choices = rng.sample([c for c in names if c != capital], 3) + [capital]
        rng.shuffle(choices)
        rows.append({"country": country, "choices": choices, "answer": choices.index(capital)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, keys in insertion order."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_all(out: Path) -> list[Path]:
    """Write every data file of the shipped tasks into `out`; returns their paths."""
    rng = random.Random(SEED)
    fewshot, test = arithmetic(rng)
    files = {"arithmetic_fewshot.jsonl": fewshot, "arithmetic_test.jsonl": test, "capitals_test.jsonl": capitals(rng)}
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_jsonl(out / name, rows)
    return [out / name for name in files]


def main() -> None:
    """Command line: --out DIR (default: megapack/evaluation/tasks beside this script's repository)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "megapack/evaluation/tasks"))
    for path in write_all(Path(parser.parse_args().out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
