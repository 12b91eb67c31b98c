"""Synthetic query logs: Zipf popularity over templated queries, with users and timestamps.

python bench/loggen.py --lines 1000000 --distinct 200000 --out /tmp/logs.jsonl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random

TEMPLATES = [
    "cheap flights to {city}",
    "hotels in {city}",
    "weather in {city} {when}",
    "things to do in {city}",
    "{thing} near me",
    "best {thing} in {city}",
    "how to make {food}",
    "{food} recipe",
    "buy {item} online",
    "{item} reviews",
    "{team} score {when}",
    "train from {city} to {city2}",
    "{item} vs {item2}",
    "what is {concept}",
    "{concept} explained",
    "open now {thing}",
]
FILL = {
    "city": [
        "paris",
        "london",
        "rome",
        "berlin",
        "tokyo",
        "madrid",
        "lisbon",
        "vienna",
        "prague",
        "dublin",
        "oslo",
        "athens",
        "cairo",
        "lima",
        "quito",
        "seoul",
        "delhi",
        "sydney",
        "toronto",
        "chicago",
        "boston",
        "denver",
        "austin",
        "miami",
        "seattle",
    ],
    "when": ["today", "tomorrow", "tonight", "this weekend", "next week", "in june"],
    "thing": ["pizza", "coffee", "pharmacy", "gym", "museum", "parking", "sushi", "bakery", "library", "dentist"],
    "food": ["pancakes", "lasagna", "ramen", "bread", "curry", "hummus", "risotto", "tacos", "granola", "soup"],
    "item": ["headphones", "laptop", "running shoes", "backpack", "kettle", "monitor", "phone case", "desk lamp"],
    "team": ["arsenal", "lakers", "yankees", "ajax", "celtics", "juventus"],
    "concept": ["inflation", "photosynthesis", "blockchain", "gravity", "entropy", "mitochondria", "recursion"],
}


def _fill(template: str, rng: random.Random) -> str:
    values = {k: rng.choice(v) for k, v in FILL.items()}
    values |= {"city2": rng.choice(FILL["city"]), "item2": rng.choice(FILL["item"])}
    return template.format(**values)


def distinct_queries(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct queries (numbered variants once the templates run out)."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    attempts = 0
    while len(seen) < n:
        query = _fill(rng.choice(TEMPLATES), rng)
        attempts += 1
        if attempts > 20 * n or query in seen:
            query = f"{query} {rng.choice(['review', 'price', 'map', 'hours', 'guide', 'deals'])} {len(seen)}"
        seen.setdefault(query, None)
    return list(seen)


def spell(query: str, rng: random.Random) -> str:
    """Another spelling of the same query: case, extra spaces, full-width letters."""
    choice = rng.random()
    if choice < 0.1:
        return query.upper()
    if choice < 0.2:
        return "  " + query.replace(" ", "  ") + " "
    if choice < 0.25:
        return query.translate({c: c + 0xFEE0 for c in range(0x21, 0x7F)})
    return query


def generate(lines: int, distinct: int, seed: int = 0, users: int = 5000):
    """Yield JSONL records {"query", "user", "ts"} with Zipf(1.1) popularity."""
    rng = random.Random(seed)
    queries = distinct_queries(distinct, seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(distinct)]
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    for i, query in enumerate(rng.choices(queries, weights, k=lines)):
        yield {
            "query": spell(query, rng),
            "user": f"u{rng.randrange(users)}",
            "ts": (start + dt.timedelta(seconds=i * 7)).isoformat(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--distinct", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as fh:
        for record in generate(args.lines, args.distinct, args.seed):
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
