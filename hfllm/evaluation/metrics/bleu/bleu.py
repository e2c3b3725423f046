"""Corpus BLEU from sacrebleu (the same numbers as the Hub's `sacrebleu` metric), loadable offline."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus-level BLEU (sacrebleu, 13a tokenizer), 0-100.",
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description="predictions: list of str; references: list of list of str (same count per item)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, tokenize: str = "13a", lowercase: bool = False):
        streams = [list(stream) for stream in zip(*references)]  # per-item references -> reference streams
        score = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize, lowercase=lowercase)
        return {
            "bleu": score.score,
            "precisions": score.precisions,
            "brevity_penalty": score.bp,
            "sys_len": score.sys_len,
            "ref_len": score.ref_len,
        }
