"""Regenerate the bundled demo data sets (deterministic): python data/demo/make_demo_data.py

The answers follow short fixed patterns (arithmetic, capitals, word translations) so that a
tiny model's loss visibly falls within two epochs; the texts come from corpus_*.txt.
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"), ("Greece", "Athens", "希腊", "雅典"),
    ("Norway", "Oslo", "挪威", "奥斯陆"), ("Thailand", "Bangkok", "泰国", "曼谷"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Austria", "Vienna", "奥地利", "维也纳"),
]
WORDS = [
    ("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("river", "河"),
    ("mountain", "山"), ("teacher", "老师"), ("friend", "朋友"), ("computer", "电脑"), ("school", "学校"),
    ("flower", "花"), ("train", "火车"), ("bread", "面包"), ("moon", "月亮"), ("sun", "太阳"),
    ("rain", "雨"), ("tea", "茶"), ("fish", "鱼"), ("bird", "鸟"),
]
GARBAGE = ["哈哈哈哈哈哈哈哈", "!!!!!!!!!!!!", "no no no no no no", "嗯嗯嗯嗯嗯嗯嗯", "???????????", "la la la la la la"]


def arithmetic(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    return f"计算 {a} 加 {b}。", f"{a} 加 {b} 等于 {a + b}。"


def capital(rng):
    en, cap, zh, zcap = rng.choice(CAPITALS)
    if rng.random() < 0.5:
        return f"What is the capital of {en}?", f"The capital of {en} is {cap}."
    return f"{zh}的首都是哪里？", f"{zh}的首都是{zcap}。"


def translate(rng):
    en, zh = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f"Translate into Chinese: {en}", f"“{en}” in Chinese is “{zh}”."
    return f"把“{zh}”翻译成英文。", f"“{zh}”的英文是“{en}”。"


def qa(rng):
    return rng.choice([arithmetic, capital, translate])(rng)


def sft_records(rng):
    out = []
    for i in range(360):
        q, a = qa(rng)
        style = i % 3
        if style == 0:
            out.append({"instruction": q, "output": a})
        elif style == 1:
            out.append({"prompt": q, "response": a})
        else:
            en, zh = rng.choice(WORDS)
            out.append({"instruct": "Answer the question about the word.", "input": f"How do you say {en} in Chinese?",
                        "output": f"“{en}” in Chinese is “{zh}”."})
    for _ in range(30):
        (q1, a1), (q2, a2) = qa(rng), qa(rng)
        out.append({"type": "conversation", "rounds": [["ask", q1], ["ans", a1], ["ask", "And another one."], ["ask", q2], ["ans", a2]]})
    for _ in range(10):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append({
            "type": "conversation",
            "api_desc": "calculator(expression: str) -> number: evaluates an arithmetic expression.",
            "rounds": [
                ["ask", f"Please use the calculator: what is {a} * {b}?"],
                ["ans-api", {"actions": [{"thought": "I should multiply the two numbers.", "api_name": "calculator",
                                          "params": {"expression": f"{a} * {b}"}, "result": a * b}],
                             "answer": f"{a} * {b} = {a * b}."}],
            ],
        })
    for _ in range(10):
        en, cap, zh, zcap = rng.choice(CAPITALS)
        out.append({"type": "conversation", "reference": f"{cap} is the capital of {en}. {zcap}是{zh}的首都。",
                    "rounds": [["ask", f"According to the reference, what is the capital of {en}?"],
                               ["ans", f"The capital of {en} is {cap}."]]})
    rng.shuffle(out)
    return out


def preference_records(rng):
    out = []
    for _ in range(200):
        q, a = qa(rng)
        out.append({"prompt": q, "chosen": a, "rejected": rng.choice(GARBAGE)})
    return out


def prompt_records(rng):
    return [{"prompt": qa(rng)[0]} for _ in range(100)]


def pretrain_records():
    out = []
    for name in ("corpus_en.txt", "corpus_zh.txt"):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            paragraphs = [p.strip() for p in f if p.strip()]
        for i, p in enumerate(paragraphs):
            out.append({"text": p})
            out.append({"title": p.split("。")[0].split(".")[0][:30], "content": p})
            out.append({"text": p, "meta": {"source": name, "paragraph": i}})
    return out


def write(name, records):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(0)
    write("sft.jsonl", sft_records(rng))
    write("preference.jsonl", preference_records(rng))
    write("prompt.jsonl", prompt_records(rng))
    write("pretrain.jsonl", pretrain_records())


if __name__ == "__main__":
    main()
