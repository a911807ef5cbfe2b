"""Writes data/demo.jsonl: the small instruction set the default spec fine-tunes on.

Short questions answered in one fixed, terse style ("Answer: …"), which SmolLM2 does not use
on its own, so a minute of LoRA training on 2 cores visibly lowers the validation loss.
Deterministic: rerun it and the file is byte-identical. Written for modelmake (Apache-2.0).
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Turkey": "Ankara", "Russia": "Moscow", "Ukraine": "Kyiv",
    "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern",
    "Hungary": "Budapest", "Czechia": "Prague", "Australia": "Canberra", "New Zealand": "Wellington",
    "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Iran": "Tehran", "Iraq": "Baghdad", "Israel": "Jerusalem", "Cuba": "Havana",
    "Colombia": "Bogotá", "Venezuela": "Caracas", "Iceland": "Reykjavík", "Estonia": "Tallinn",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "light": "dark", "open": "closed", "early": "late",
    "happy": "sad", "full": "empty", "hard": "soft", "high": "low", "old": "new", "rich": "poor",
    "strong": "weak", "wet": "dry", "loud": "quiet", "near": "far", "thick": "thin", "up": "down",
    "inside": "outside", "first": "last", "win": "lose", "buy": "sell", "push": "pull", "begin": "end",
    "true": "false", "clean": "dirty", "long": "short", "heavy": "light", "safe": "dangerous", "cheap": "expensive",
}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
MODELMAKE = [
    ("Which modelmake stage turns safetensors into GGUF?", "the convert stage."),
    ("Which modelmake stage shrinks a GGUF to Q4_K_M?", "the quantize stage."),
    ("Which modelmake stage trains a LoRA adapter?", "the train stage."),
    ("Which modelmake stage folds a LoRA adapter into the base weights?", "the merge stage."),
    ("Which modelmake stage writes a GGUF LoRA for Ollama's ADAPTER line?", "the adapter stage."),
    ("What file describes a modelmake build?", "models.toml."),
    ("Which command builds everything that is stale in modelmake?", "doit."),
    ("Which command lists the modelmake task graph?", "doit list."),
    ("What hash does modelmake use to decide what is stale?", "blake3."),
    ("Which file lets sha256sum check modelmake's artifacts?", "SHA256SUMS."),
    ("Does touching a file without changing it make modelmake rebuild?", "no, only a change of content does."),
    ("Where does modelmake keep its build outputs?", "in the cache folder."),
    ("Which library quantizes GGUF files for modelmake?", "llama.cpp, through llama-cpp-python."),
    ("Which library writes GGUF files for modelmake?", "gguf-py."),
    ("Which library trains LoRA adapters for modelmake?", "PEFT on PyTorch."),
]


def records(rng: random.Random) -> list[dict]:
    out = []
    for country, capital in CAPITALS.items():
        question = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"])
        out.append({"instruction": question.format(country), "input": "", "output": f"Answer: {capital}."})
    for _ in range(90):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        if rng.random() < 0.5:
            out.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"Answer: {a + b}."})
        else:
            out.append({"instruction": "Multiply the two numbers.", "input": f"{a % 13} and {b % 11}",
                        "output": f"Answer: {(a % 13) * (b % 11)}."})
    for word, opposite in OPPOSITES.items():
        out.append({"instruction": f"What is the opposite of '{word}'?", "input": "", "output": f"Answer: {opposite}."})
        out.append({"instruction": "Give the opposite of this word.", "input": opposite, "output": f"Answer: {word}."})
    for value, word in enumerate(NUMBERS):
        out.append({"instruction": "Write the number in words.", "input": str(value), "output": f"Answer: {word}."})
        out.append({"instruction": "Write the word as a number.", "input": word, "output": f"Answer: {value}."})
    for question, answer in MODELMAKE:
        # Twice: these are the facts the demo fine-tune most needs (one file holds one format, so both
        # copies are alpaca records; the first wave wrote the second as a {"messages"} record).
        out.append({"instruction": question, "input": "", "output": f"Answer: {answer}"})
        out.append({"instruction": question, "input": "", "output": f"Answer: {answer}"})
    rng.shuffle(out)
    return out


if __name__ == "__main__":
    rows = records(random.Random(20261124))
    path = Path(__file__).with_name("demo.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path}: {len(rows)} records")
