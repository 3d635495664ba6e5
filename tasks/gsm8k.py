"""
GSM8K: grade-school math word problems with worked solutions.
https://huggingface.co/datasets/openai/gsm8k

A solution looks like this:

    Tom buys 3 packs of 4 pens, so he has 3*4 = <<3*4=12>>12 pens.
    He gives away 5, leaving 12-5 = <<12-5=7>>7 pens.
    #### 7

The <<expression=result>> spans are calculator calls. We turn each into a python
tool-call part (the expression) followed by a python_output part (the result), so
the model learns to call the tool and the tool's output is never trained on.
The final answer follows the '####' marker.
"""

import re
from tasks.common import Task, load_hub_dataset


GSM_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
def extract_answer(completion):
    """
    The number after the '####' marker with thousands separators removed, or None.
    Same normalisation as OpenAI's reference grader (grade_school_math/dataset.py).
    """
    match = GSM_RE.search(completion)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


# a whole calculator call, kept by re.split because of the capturing group
TOOL_CALL_RE = re.compile(r'(<<[^>]+>>)')


class GSM8K(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ["main", "socratic"], "GSM8K subset must be main|socratic"
        assert split in ["train", "test"], "GSM8K split must be train|test"
        self.ds = load_hub_dataset("openai/gsm8k", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self):
        return 'generative'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        """One problem as a conversation: the question, then the solution as a list of parts."""
        row = self.ds[index]
        parts = []
        # split keeps empty strings around back-to-back calls and at the ends; they are
        # kept as empty text parts (they render to no tokens), and the last part is
        # always the text holding the '#### answer' line, which evaluate() relies on
        for piece in TOOL_CALL_RE.split(row['answer']):
            if piece.startswith('<<') and piece.endswith('>>'):
                call = piece[2:-2]
                # the result is after the last '=', the expression may itself contain '='
                expression, result = call.rsplit('=', 1) if '=' in call else (call, "")
                parts.append({"type": "python", "text": expression})
                parts.append({"type": "python_output", "text": result})
            else:
                parts.append({"type": "text", "text": piece})
        messages = [
            {"role": "user", "content": row['question']}, # a plain string
            {"role": "assistant", "content": parts}, # a list of parts
        ]
        return {"messages": messages}

    def evaluate(self, conversation, assistant_response):
        """
        1 if the sampled response ends on the same '####' number as the reference
        solution (the conversation's last message), else 0.
        The response is taken to be a plain string for now.
        """
        assert isinstance(assistant_response, str), "Assuming simple string response for now"
        reference = conversation['messages'][-1]
        assert reference['role'] == "assistant", "Last message must be from the Assistant"
        assert isinstance(reference['content'], list), "This is expected to be a list of parts"
        ref_num = extract_answer(reference['content'][-1]['text'])
        pred_num = extract_answer(assistant_response)
        return int(pred_num == ref_num)

    def reward(self, conversation, assistant_response):
        """RL reward: plain correctness as a float (no credit for format or partial work yet)."""
        return float(self.evaluate(conversation, assistant_response))
