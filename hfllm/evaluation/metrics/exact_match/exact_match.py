"""Exact match rate (0-1), with the options of the Hub's `exact_match` metric, loadable offline."""

import re
import string

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference after the chosen normalisations.",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False, ignore_numbers=False):
        def normalise(text: str) -> str:
            for pattern in regexes_to_ignore or []:
                text = re.sub(pattern, "", text)
            if ignore_case:
                text = text.lower()
            if ignore_punctuation:
                text = text.translate(str.maketrans("", "", string.punctuation))
            if ignore_numbers:
                text = text.translate(str.maketrans("", "", string.digits))
            return text

        matches = [normalise(p) == normalise(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / max(len(matches), 1)}
