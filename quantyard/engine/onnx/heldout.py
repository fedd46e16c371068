"""Held-apart sentences for judging an encoder artifact (pure data).

Never used to calibrate, smooth or validate a conversion (samples.py holds those): an artifact
is scored here on text its recipe never saw. Mixed on purpose, because int8 damage is worst
where the tokens are few or unusual: one-word and very short inputs, questions, long sentences,
numbers and units, code, markup, names, all-caps, emoji, and non-English text (which an
English WordPiece vocabulary splits into many pieces). Written for this project (no licence
question).
"""

from __future__ import annotations

HELDOUT_SENTENCES = (
    "Ok.",
    "Yes",
    "Thanks!",
    "Good morning.",
    "Why?",
    "Solar panels on the roof produce most of the house's electricity in summer.",
    "Where is the nearest train station?",
    "The committee postponed its decision until more data from the second clinical trial becomes "
    "available next spring, which disappointed several of the patient groups that had campaigned "
    "for faster approval.",
    "Numbers like 3.14159 and 2,718 show up in many formulas.",
    "The package weighs 2.5 kg and costs $19.99 including shipping.",
    "Call me at 555-0199 after 6 pm.",
    "def add(a, b):\n    return a + b",
    "SELECT name, email FROM users WHERE created_at > '2024-01-01';",
    "<div class=\"header\">Welcome back</div>",
    "https://example.com/docs/getting-started?lang=en",
    "WARNING: DISK USAGE ABOVE 90 PERCENT",
    "I love this phone 😍 but the battery dies too fast 😡",
    "Bonjour tout le monde.",
    "Der Zug nach München hat zwanzig Minuten Verspätung.",
    "¿Dónde está la biblioteca?",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "My grandmother baked bread every Sunday morning.",
    "The stock fell 12% after the earnings call.",
    "Can you recommend a good book about the history of mathematics?",
    "He didn't say a word.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The quarterback threw a forty-yard pass in the final seconds of the game.",
    "Please turn off the lights when you leave the room.",
    "A small boat drifted slowly across the calm lake at sunset.",
    "Error 404: page not found",
    "John Smith, Jane Doe and Dr. Alice Wong signed the agreement in Geneva.",
)

__all__ = ["HELDOUT_SENTENCES"]
