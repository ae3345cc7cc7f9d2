"""Beam-5 decoding (length penalty 1.0) of the CPU-target runs' saved models on test_2016_flickr, to set beside the
runs' own greedy BLEU.

    python benchmarks/translation_beam_check.py RUNS_DIR DATA_DIR OUT_JSON SEED [SEED ...]
"""
import gzip, json, sys, torch, sacrebleu
RUNS, DATA, OUT = sys.argv[1:4]
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
torch.set_num_threads(1)
refs = [l.strip() for l in gzip.open(f'{DATA}/test_2016_flickr.en.gz', 'rt')]
srcs = [l.strip() for l in gzip.open(f'{DATA}/test_2016_flickr.de.gz', 'rt')]
out = {}
for seed in sys.argv[4:]:
    d = f'{RUNS}/arm-defaults__seed-{seed}'
    model, tok = AutoModelForSeq2SeqLM.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    order = sorted(range(len(srcs)), key=lambda i: len(srcs[i]))
    hyp = [None] * len(srcs)
    with torch.no_grad():
        for k in range(0, len(order), 64):
            idx = order[k:k + 64]
            x = tok([srcs[i] for i in idx], return_tensors='pt', padding=True, truncation=True, max_length=128)
            g = model.generate(**x, num_beams=5, length_penalty=1.0, max_length=min(128, int(1.5 * x.input_ids.shape[1]) + 10))
            for i, t in zip(idx, tok.batch_decode(g, skip_special_tokens=True)):
                hyp[i] = t.strip()
    metric = sacrebleu.metrics.BLEU()
    b = metric.corpus_score(hyp, [refs])
    out[seed] = {"test_bleu_beam5": b.score, "len_ratio": b.sys_len / b.ref_len, "signature": str(metric.get_signature())}
    print(seed, out[seed], flush=True)
    json.dump(out, open(OUT, 'w'), indent=1)
