"""The toy world: synthetic scenes, a LLaVA trained on them on a CPU, and the benchmark of every policy.

    scenes.py           the scenes, their questions and captions (what the toy model learns)
    train.py            trains the toy LLaVA from scratch: python -m tinyavl.toy.train --out weights/toy --force
    evaluate.py         accuracy under each KV policy, budget sweep: python -m tinyavl.toy.evaluate --table
    attention_study.py  where its attention goes (tutorial chapter 4): python -m tinyavl.toy.attention_study
    train_hires.py      the FlexAttention toy, and the in-sequence one it is measured against (chapter 7)
    evaluate_hires.py   the FlexAttention toy reading nothing, its choice, or every block: accuracy and FLOPs
    plot.py             the line plots that evaluate, evaluate_hires and attention_study draw

The library (tinyavl/) never imports from here.
"""
