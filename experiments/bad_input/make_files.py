"""Bad input files for run.sh (issue 11): one per kind of problem."""

import json


def w(name, recs):
    open(name, "w").write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


good = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
open("surrogate.jsonl", "w").write(
    json.dumps(good) + "\n" + json.dumps(good).replace('"\\u4f60\\u597d\\uff01"', '"\\ud800"') + "\n"
)
open("deep.jsonl", "w").write(json.dumps(good) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
open("bigint.jsonl", "w").write(json.dumps(good) + "\n" + '{"id": ' + "9" * 5000 + "}\n")
w("history.jsonl", [{"prompt": "q", "response": "a", "history": ""}])
w("dup.jsonl", [{"id": 7, **good}, {"id": "7", **good}])
w(
    "system.jsonl",
    [{"system": "s", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}],
)
w("glmhist.jsonl", [{"prompt": "q", "response": "a", "history": [["q0", "a0"], [3, "a1"]]}])
w("empty.jsonl", [])
msgs = []
for i in range(500):
    msgs += [
        {"role": "user", "content": f"第{i}个问题：今天天气怎么样，我们要不要出去走走？"},
        {"role": "assistant", "content": f"第{i}个回答：天气很好，可以去公园散步，也可以去看电影。"},
    ]
w("long.jsonl", [{"id": "long", "messages": msgs}])

# Issue 20: texts with nothing visible, and a text in NFD (decomposed) form.
invisible = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "\u200b\u200b"}]
w(
    "invisible.jsonl",
    [good, {"messages": invisible}, {"messages": [good["messages"][0], {"role": "assistant", "content": "\x00"}]}],
)
nfd = {
    "messages": [{"role": "user", "content": "caf\u0065\u0301，你好"}, {"role": "assistant", "content": "好的"}]
}
w("nfd.jsonl", [nfd, good])
