"""A reward for the evaluator's test that a random tiny model earns about half the time: 1.0 when
the response contains the last digit of the answer (the arith reward would give it 0 everywhere)."""


def digit_reward(text: str, meta: dict) -> float:
    return float(str(abs(int(meta["answer"])) % 10) in text)
