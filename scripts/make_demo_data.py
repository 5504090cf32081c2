"""Generate the shipped demo task: routing support tickets to made-up team codes.

The base model cannot know the codes (ROUTE: LEDGER, ROUTE: DOCK, ...), so it scores ~0 exact
match; a LoRA adapter learns both the format and the keyword-to-team mapping from a few dozen
steps. Each example carries its `team`, so federated clients can be given non-IID shares.

    python scripts/make_demo_data.py  # rewrites llm/demo_task/tickets.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "llm" / "demo_task" / "tickets.jsonl"
SEED = 1234
PER_TEAM = 130

# Team code -> things customers write about. The codes are invented on purpose.
ISSUES = {
    "LEDGER": [
        "I was charged twice for my subscription",
        "my invoice shows the wrong amount",
        "I need a refund for last month's payment",
        "my credit card was declined at checkout",
        "the discount code did not reduce my bill",
        "I want to change my billing address on the invoice",
        "there is an unexpected fee on my statement",
        "please send me a receipt for my payment",
        "my annual plan renewed at a higher price",
        "the tax on my invoice looks wrong",
    ],
    "DOCK": [
        "my parcel has not arrived yet",
        "the tracking number does not work",
        "the package arrived damaged",
        "I received the wrong item in the box",
        "the courier left my order at the wrong address",
        "can I change the delivery date of my order",
        "my shipment is stuck in customs",
        "half of my order is missing from the delivery",
        "I want to return an item and need a shipping label",
        "delivery is a week late",
    ],
    "FORGE": [
        "the app crashes when I open settings",
        "I get an error 500 when I upload a file",
        "the website is very slow to load",
        "the sync between my phone and laptop stopped working",
        "the export button does nothing",
        "I cannot connect the device to wifi",
        "the update failed halfway through installation",
        "notifications stopped appearing on my phone",
        "the search results are empty even for exact names",
        "the screen goes black after the latest update",
    ],
    "GATE": [
        "I forgot my password and the reset email never comes",
        "my account was locked after too many attempts",
        "I want to delete my account",
        "someone else logged into my account",
        "I need to change the email address on my profile",
        "two-factor codes are not accepted",
        "I cannot log in with my username",
        "please merge my two accounts",
        "how do I add a second user to my account",
        "my profile name shows someone else's name",
    ],
}
OPENERS = [
    "Hello,",
    "Hi team,",
    "Good morning.",
    "Urgent:",
    "Hey there,",
    "Dear support,",
    "Quick question:",
    "",
]
CLOSERS = [
    "Please help.",
    "Thanks in advance.",
    "What should I do?",
    "This is really frustrating.",
    "Can you fix this today?",
    "",
]
PRODUCTS = ["", " with my Nimbus order", " on the Orbit plan", " for order 4471", " since Monday"]


def make_ticket(rng: random.Random, issue: str) -> str:
    parts = [rng.choice(OPENERS), issue + rng.choice(PRODUCTS) + ".", rng.choice(CLOSERS)]
    return " ".join(p for p in parts if p)


def main() -> None:
    rng = random.Random(SEED)
    rows = []
    for team, issues in ISSUES.items():
        seen: set[str] = set()
        while len(seen) < PER_TEAM:
            ticket = make_ticket(rng, rng.choice(issues))
            if ticket in seen:
                continue
            seen.add(ticket)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": f"Route this support ticket: {ticket}"},
                        {"role": "assistant", "content": f"ROUTE: {team}"},
                    ],
                    "team": team,
                }
            )
    rng.shuffle(rows)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} examples to {OUT}")


if __name__ == "__main__":
    main()
