"""
MMLU: four-choice questions over 57 subjects, graded by the letter the model picks.
https://huggingface.co/datasets/cais/mmlu
Its auxiliary_train split (about 100K rows) also goes into the SFT mixture to teach
the multiple-choice answer format.
"""

from tasks.common import Task, load_hub_dataset, render_mc


class MMLU(Task):

    letters = ('A', 'B', 'C', 'D')
    # the 57 subjects, for grouping results
    groups = ('abstract_algebra', 'anatomy', 'astronomy', 'business_ethics', 'clinical_knowledge',
              'college_biology', 'college_chemistry', 'college_computer_science', 'college_mathematics',
              'college_medicine', 'college_physics', 'computer_security', 'conceptual_physics',
              'econometrics', 'electrical_engineering', 'elementary_mathematics', 'formal_logic',
              'global_facts', 'high_school_biology', 'high_school_chemistry',
              'high_school_computer_science', 'high_school_european_history', 'high_school_geography',
              'high_school_government_and_politics', 'high_school_macroeconomics',
              'high_school_mathematics', 'high_school_microeconomics', 'high_school_physics',
              'high_school_psychology', 'high_school_statistics', 'high_school_us_history',
              'high_school_world_history', 'human_aging', 'human_sexuality', 'international_law',
              'jurisprudence', 'logical_fallacies', 'machine_learning', 'management', 'marketing',
              'medical_genetics', 'miscellaneous', 'moral_disputes', 'moral_scenarios', 'nutrition',
              'philosophy', 'prehistory', 'professional_accounting', 'professional_law',
              'professional_medicine', 'professional_psychology', 'public_relations',
              'security_studies', 'sociology', 'us_foreign_policy', 'virology', 'world_religions')

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ["all"], f"subset {subset} must be all"
        assert split in ["auxiliary_train", "validation", "dev", "test"], f"split {split} must be auxiliary_train|validation|dev|test"
        self.subset = subset
        self.split = split
        self.ds = load_hub_dataset("cais/mmlu", subset, split=split).shuffle(seed=42)

    @property
    def eval_type(self):
        return 'categorical'

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        choices = row["choices"] # four answer texts
        answer = row["answer"] # index of the right one, 0..3
        assert len(choices) == 4, "MMLU should have 4 choices"
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, choices)},
            {"role": "assistant", "content": self.letters[answer]},
        ]
        return {
            "messages": messages,
            "subject": row["subject"], # e.g. "anatomy", to break results down by subject
            "letters": self.letters, # the evaluator restricts the model's choice to these
        }

    def evaluate(self, conversation, assistant_response):
        # categorical eval always hands us one of the letters; anything else is a caller bug
        assert assistant_response in self.letters, f"MMLU answer {assistant_response} is expected to be one of {self.letters}"
        return assistant_response == conversation['messages'][-1]['content']
