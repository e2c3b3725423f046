"""Corpus chrF from sacrebleu (word_order=2 gives chrF++), loadable offline."""

import datasets
import evaluate
import sacrebleu


class Chrf(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus-level chrF from sacrebleu, 0-100; word_order=2 gives chrF++.",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description="predictions: list of str; references: list of list of str (same count per item)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, char_order: int = 6, word_order: int = 0, beta: int = 2):
        streams = [list(stream) for stream in zip(*references)]
        score = sacrebleu.corpus_chrf(predictions, streams, char_order=char_order, word_order=word_order, beta=beta)
        return {"score": score.score, "char_order": char_order, "word_order": word_order, "beta": beta}
