"""
ARC (AI2 Reasoning Challenge): grade-school science multiple choice, in an Easy and
a Challenge subset. https://huggingface.co/datasets/allenai/ai2_arc
"""

from tasks.common import Task, load_hub_dataset, render_mc


class ARC(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ["ARC-Easy", "ARC-Challenge"], "ARC subset must be ARC-Easy or ARC-Challenge"
        assert split in ["train", "validation", "test"], "ARC split must be train|validation|test"
        self.ds = load_hub_dataset("allenai/ai2_arc", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self):
        return 'categorical'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        # unlike MMLU the labels come with the row: mostly A-D, sometimes A-E or 1-4
        letters = row["choices"]["label"]
        choices = row["choices"]["text"]
        answer_string = row["answerKey"]
        assert answer_string in letters, f"ARC answer {answer_string} must be one of {letters}"
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, choices)},
            {"role": "assistant", "content": answer_string},
        ]
        return {
            "messages": messages,
            "letters": letters, # the evaluator restricts the model's choice to these
        }

    def evaluate(self, conversation, assistant_response):
        # categorical eval always hands us one of the letters; anything else is a caller bug
        assert assistant_response in conversation['letters'], f"ARC answer {assistant_response} is expected to be one of {conversation['letters']}"
        return assistant_response == conversation['messages'][-1]['content']
