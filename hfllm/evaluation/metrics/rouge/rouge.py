"""ROUGE-1/2/L/Lsum F-measure from Google's rouge_score (mean over items, 0-1), loadable offline."""

import datasets
import evaluate
from rouge_score import rouge_scorer


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE F-measures averaged over items (rouge_score), 0-1.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL", "rougeLsum"), use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
        return {kind: sum(s[kind].fmeasure for s in scores) / max(len(scores), 1) for kind in rouge_types}
