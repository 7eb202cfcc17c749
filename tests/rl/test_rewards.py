"""Rewards, reward specs, scoring errors and GRPO group advantages."""

import math

import pytest
import torch

from megatron_latent.rl.rewards import (REWARDS, RewardError, accuracy_reward,
                                        group_advantages, make_format_reward, parse_reward_spec,
                                        register_reward, score_completions)

GOOD = "<|lvr_start|><|lvr|><|lvr|><|lvr_end|> <answer>B</answer>"

format_reward = make_format_reward("<|lvr_start|>", "<|lvr_end|>")
WITH_FORMAT = {**REWARDS, "format": format_reward}  # what the RL loop gives LVR


@pytest.fixture
def extra_rewards():
    """Registers test rewards and removes them afterwards, so REWARDS stays as shipped."""
    added = []

    def add(name, fn):
        register_reward(name, fn)
        added.append(name)

    yield add
    for name in added:
        del REWARDS[name]


@pytest.mark.parametrize("completion, reference, expected", [
    ("<answer>B</answer>", "<answer>B</answer>", 1.0),
    ("<answer> (b) </answer>", "<answer>B</answer>", 1.0),
    ("<answer>1,000</answer>", "1000", 1.0),  # a bare reference is used as is
    ("<answer>C</answer>", "<answer>B</answer>", 0.0),
    ("B", "<answer>B</answer>", 0.0),  # no <answer> in the completion
    ("no answer", "", 0.0),
])
def test_accuracy_reward(completion, reference, expected):
    assert accuracy_reward(completion, reference) == expected


@pytest.mark.parametrize("completion, expected", [
    (GOOD, 1.0),
    ("\n " + GOOD + "\n<|im_end|>\n", 1.0),
    (GOOD + "<|endoftext|>", 1.0),
    ("<|lvr_start|>looks\nleft<|lvr_end|>\n<answer>two\nlines</answer>", 1.0),  # DOTALL
    ("<answer>B</answer>", 0.0),  # no latent span
    ("<|lvr_start|><|lvr|><answer>B</answer>", 0.0),  # no lvr_end
    ("text " + GOOD, 0.0),
    (GOOD + " trailing", 0.0),
    (GOOD + "<|im_end|><|im_end|>", 0.0),  # one end token at most
    ("<|lvr_start|><|lvr_end|><answer>B", 0.0),
])
def test_format_reward(completion, expected):
    assert format_reward(completion, "") == expected


def test_make_format_reward_custom_tokens():
    fn = make_format_reward(start="<think>", end="</think>")
    assert fn("<think>x</think><answer>y</answer>", "") == 1.0
    assert fn(GOOD, "") == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        make_format_reward(start="", end="<|lvr_end|>")


def test_parse_reward_spec():
    assert parse_reward_spec("accuracy:1.0, format:0.5", WITH_FORMAT) == [("accuracy", 1.0), ("format", 0.5)]
    assert parse_reward_spec("format", WITH_FORMAT) == [("format", 1.0)]
    assert parse_reward_spec("accuracy:-2") == [("accuracy", -2.0)]


@pytest.mark.parametrize("spec, message", [
    ("", "empty entry"),
    ("accuracy:1,", "empty entry"),
    ("acuracy:1", "unknown reward 'acuracy'; known: \\['accuracy', 'format'"),  # + any registered later
    ("accuracy:high", "weight 'high' of 'accuracy' is not a number"),
    ("accuracy:", "weight '' of 'accuracy' is not a number"),
    ("accuracy:nan", "weight of 'accuracy' is nan, not finite"),
    ("format:1,format:2", "reward 'format' appears 2 times"),
])
def test_parse_reward_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(spec, WITH_FORMAT)


def test_format_is_the_methods():
    with pytest.raises(ValueError, match="unknown reward 'format'"):  # no method: no format
        parse_reward_spec("format")


def test_register_reward_errors(extra_rewards):
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy", accuracy_reward)
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b", accuracy_reward)
    with pytest.raises(TypeError, match="not callable"):
        register_reward("x", 1.0)
    extra_rewards("length", lambda c, r: float(len(c)))
    assert parse_reward_spec("length:0.1") == [("length", 0.1)]


def test_score_completions():
    completions = [GOOD, "<answer>B</answer>", GOOD.replace(">B<", ">C<")]
    references = ["<answer>B</answer>"] * 3
    total, parts = score_completions(completions, references, [("accuracy", 1.0), ("format", 0.5)],
                                     rewards=WITH_FORMAT)
    assert parts["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 1.0]
    assert total.tolist() == [1.5, 1.0, 0.5]
    assert total.dtype == torch.float32 and parts["format"].dtype == torch.float32


def test_reward_returning_nan_raises(extra_rewards):
    extra_rewards("nan_reward", lambda c, r: float("nan") if c == "bad" else 1.0)
    with pytest.raises(RewardError, match="reward 'nan_reward' returned non-finite nan on "
                                          "sample 1 \\(id 'q7'\\)"):
        score_completions(["ok", "bad"], ["x", "x"], [("nan_reward", 1.0)], sample_ids=["q6", "q7"])


def test_reward_returning_non_number_raises(extra_rewards):
    extra_rewards("none_reward", lambda c, r: None)
    with pytest.raises(RewardError, match="reward 'none_reward' returned non-numeric None "
                                          "\\(NoneType\\) on sample 0$"):
        score_completions(["a"], ["b"], [("none_reward", 1.0)])


def test_raising_reward_names_sample_id(extra_rewards):
    def boom(completion, reference):
        if completion == "two":
            raise KeyError("missing field")
        return 0.0

    extra_rewards("boom", boom)
    with pytest.raises(RewardError, match="reward 'boom' raised on sample 2 \\(id 'img-3'\\): "
                                          "KeyError: 'missing field'") as info:
        score_completions(["zero", "one", "two"], ["r"] * 3, [("format", 1.0), ("boom", 1.0)],
                          sample_ids=["img-1", "img-2", "img-3"], rewards={**WITH_FORMAT, **REWARDS})
    assert isinstance(info.value.__cause__, KeyError)


def test_score_completions_argument_errors():
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        score_completions(["a", "b"], ["a"], [("accuracy", 1.0)])
    with pytest.raises(ValueError, match="2 completions but 3 sample ids"):
        score_completions(["a", "b"], ["a", "b"], [("accuracy", 1.0)], sample_ids=["1", "2", "3"])
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        score_completions(["a"], ["a"], [("bleu", 1.0)])
    with pytest.raises(ValueError, match="no rewards"):
        score_completions(["a"], ["a"], [])


def test_group_advantages_hand_worked():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735;
    # advantage +-0.5 / (0.57735 + 1e-4) = +-0.86588. Group [2, 2, 2, 2]: std 0 -> advantage 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert a == pytest.approx(0.86588, abs=1e-5)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    torch.testing.assert_close(group_advantages(rewards.view(2, 4), 4), expected.view(2, 4))
    # Unscaled: mean-centred only. Groups of 2: [3, 1] -> [1, -1], [0, 4] -> [-2, 2].
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0, 0.0, 4.0]), 2, scale=False),
                               torch.tensor([1.0, -1.0, -2.0, 2.0]))
    # Group [3, 1]: unbiased std sqrt(2) -> advantage +-1 / (1.41421 + 1e-4).
    b = 1 / (math.sqrt(2) + 1e-4)
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([b, -b]))


def test_group_advantages_size_one_is_zero():
    out = group_advantages(torch.tensor([5.0, -1.0]), 1)
    assert out.tolist() == [0.0, 0.0]
    assert group_advantages(torch.tensor([1, 0]), 2).dtype == torch.float32  # ints promoted


@pytest.mark.parametrize("rewards, group_size, message", [
    (torch.tensor([]), 2, "rewards is empty"),
    (torch.tensor([1.0]), 0, "group_size=0 must be >= 1"),
    (torch.tensor([1.0, 2.0, 3.0]), 2, "3 rewards do not split into groups of 2"),
    (torch.zeros(2, 3), 2, "shape \\(2, 3\\) but group_size=2"),
    (torch.zeros(1, 1, 2), 2, "1-D or 2-D"),
    (torch.tensor([1.0, float("inf")]), 2, "rewards\\[1\\] \\(flat index\\) is inf"),
])
def test_group_advantages_errors(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size)


# --- HyLaR-style format, repetition-penalised accuracy, judge --------------------------------

from megatron_latent.eval.formats import (make_span_renderer,  # noqa: E402
                                          make_think_span_format_reward)
from megatron_latent.rl.rewards import JudgeItem, load_judge, make_accuracy_reward  # noqa: E402

START, END, LATENT = "<|canvas_start|>", "<|canvas_end|>", "<|canvas|>"
SPAN = START + LATENT * 3 + END
think_span_format = make_think_span_format_reward(START, END, LATENT)


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think>" + SPAN + "<think>b</think><answer>B</answer>", 1.0),
    ("<think>a</think>\n" + SPAN + "\n<think>b</think>\n<answer>B</answer><|im_end|>", 1.0),
    # two spans; the end-of-turn tokens are removed wherever they are
    ("<think>a</think>" + SPAN + "<think>b</think>" + SPAN + "<think>c</think><answer>B</answer>"
     "<|endoftext|>", 1.0),
    # whitespace around '<', '>' and '/' is squeezed out; newlines inside DOTALL spans are fine
    ("  < think > a\nb < /think >\n\n " + SPAN + " <think>b</ think>\n< answer >B</answer >\n",
     1.0),
    # a span's content is replaced whatever it decoded to, even nothing
    ("<think>a</think>" + START + "junk" + END + "<think>b</think><answer>B</answer>", 1.0),
    ("<think>a</think>" + START + END + "<think>b</think><answer>B</answer>", 1.0),
    ("<think>a</think><answer>B</answer>", 0.0),  # no span
    ("<think>a</think>" + SPAN + "<think>b</think>", 0.0),  # no answer
    ("<think>a</think>" + SPAN + "<answer>B</answer>", 0.0),  # no think after the span
    (SPAN + "<think>b</think><answer>B</answer>", 0.0),  # no think before the span
    ("<think>a</think>" + START + LATENT + "<think>b</think><answer>B</answer>", 0.0),  # unclosed
    ("<think>a</think>" + SPAN + "<think>b</think><answer>B</answer> trailing", 0.0),
])
def test_think_span_format(completion, expected):
    assert think_span_format(completion, "") == expected


def test_span_renderer():
    render = make_span_renderer(START, END, LATENT)
    assert render("x" + SPAN + "y<|im_end|>") == "x<|canvas_start|><canvas><|canvas_end|>y"
    with pytest.raises(ValueError, match="non-empty"):
        make_span_renderer(START, END, "")


LOOPING = "<answer>B</answer> " + "the same words again and again " * 20


def test_accuracy_with_repetition_limit():
    acc = make_accuracy_reward(repetition_limit=0.5)
    assert acc("<answer>B</answer>", "B") == 1.0
    assert acc("<answer>C</answer>", "B") == 0.0
    assert acc(LOOPING, "B") == -1.0  # correct, but a loop
    assert make_accuracy_reward()(LOOPING, "B") == 1.0  # no limit: plain accuracy
    # 25 tokens twice + 50 distinct: repetition score exactly 0.5, not above the limit
    text = " ".join([f"t{i}" for i in range(25)] * 2 + [f"u{i}" for i in range(50)])
    assert acc(text + " <answer>B</answer>", "B") == 1.0


def test_repetition_sees_rendered_text():
    # The renderer turns each span into one "<canvas>" word; without it the latent tokens vanish.
    # "<canvas> a b c" repeated 2x: 8 tokens, 4-grams 4 distinct of 5 -> 0.2 > 0.1.
    # Unrendered, "a b c a b c" are 6 tokens: 4-grams abca bcab cabc -> 0.
    text = ("<think>a b c</think>" + SPAN) * 2
    render = make_span_renderer(START, END, LATENT)
    assert make_accuracy_reward(0.1, preprocess=render)(text, "B") == -1.0
    assert make_accuracy_reward(0.1)(text, "B") == 0.0


def _recording_judge(verdicts):
    calls = []

    def judge(items):
        calls.append(list(items))
        return verdicts

    return judge, calls


JUDGE_COMPLETIONS = ["<answer>B</answer>",  # rule-correct: not judged
                     "<answer>the second one</answer>",  # rule-wrong: judged, True
                     "no answer at all",  # no <answer>: not judged
                     "<answer>purple</answer>",  # judged, False
                     "<answer>maybe</answer>"]  # judged, None


def test_judge_flips_wrong_answers():
    judge, calls = _recording_judge([True, False, None])
    total, parts = score_completions(JUDGE_COMPLETIONS, ["<answer>B</answer>"] * 5,
                                     [("accuracy", 0.9), ("format", 0.1)], rewards=WITH_FORMAT,
                                     judge=judge, questions=[f"q{i}" for i in range(5)])
    assert calls == [[JudgeItem("q1", "the second one", "B", JUDGE_COMPLETIONS[1]),
                      JudgeItem("q3", "purple", "B", JUDGE_COMPLETIONS[3]),
                      JudgeItem("q4", "maybe", "B", JUDGE_COMPLETIONS[4])]]  # one call
    assert parts["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert parts["judged"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert parts["judge_flipped"].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([0.9, 0.9, 0.0, 0.0, 0.0]))


def test_judge_skips_repetition_penalty_and_empty_batches():
    judge, calls = _recording_judge([])
    rewards = {"accuracy": make_accuracy_reward(0.5)}
    total, parts = score_completions([LOOPING.replace(">B<", ">C<"), "<answer>B</answer>"],
                                     ["B", "B"], [("accuracy", 1.0)], rewards=rewards, judge=judge)
    assert calls == []  # -1 is not a 0, the other is correct: nothing to judge
    assert parts["accuracy"].tolist() == [-1.0, 1.0]
    assert parts["judged"].tolist() == [0.0, 0.0]


def test_no_judge_keeps_the_components():
    _, parts = score_completions(["<answer>C</answer>"], ["B"], [("accuracy", 1.0)])
    assert list(parts) == ["accuracy"]


@pytest.mark.parametrize("verdicts, message", [
    ([True], "judge returned 1 verdicts for 2 samples"),
    (None, "judge returned None for 2 samples"),
    ([True, 1], "judge returned 1 \\(int\\) for sample 3 \\(id 'c'\\); expected True, False or "
                "None"),
])
def test_judge_return_is_checked(verdicts, message):
    judge, _ = _recording_judge(verdicts)
    with pytest.raises(RewardError, match=message):
        score_completions(["<answer>B</answer>", "<answer>x</answer>", "z", "<answer>y</answer>"],
                          ["B"] * 4, [("accuracy", 1.0)], sample_ids=["a", "b", "z", "c"],
                          judge=judge)


def test_judge_errors():
    def broken(items):
        raise RuntimeError("model not loaded")

    with pytest.raises(RewardError, match="judge raised on 1 samples \\(first: sample 0\\): "
                                          "RuntimeError: model not loaded"):
        score_completions(["<answer>x</answer>"], ["B"], [("accuracy", 1.0)], judge=broken)
    with pytest.raises(ValueError, match="a judge re-scores the 'accuracy' reward"):
        score_completions(["a"], ["b"], [("format", 1.0)], rewards=WITH_FORMAT,
                          judge=lambda items: [])
    with pytest.raises(ValueError, match="1 completions but 2 questions"):
        score_completions(["a"], ["b"], [("accuracy", 1.0)], judge=lambda items: [],
                          questions=["q", "r"])


def test_load_judge(tmp_path):
    path = tmp_path / "my_judge.py"
    path.write_text("def judge(items):\n    return [i.prediction == 'yes' for i in items]\n"
                    "NOT_A_JUDGE = 3\n")
    judge = load_judge(f"{path}:judge")
    assert judge([JudgeItem("q", "yes", "r"), JudgeItem("q", "no", "r")]) == [True, False]
    assert load_judge("megatron_latent.eval.answers:answers_match") is not None


@pytest.mark.parametrize("spec, error, message", [
    ("no_colon", ValueError, "expected 'package.module:function'"),
    ("module:", ValueError, "expected"),
    ("missing_dir/judge.py:judge", FileNotFoundError, "judge missing_dir/judge.py: no such file"),
    ("no_such_module_xyz:judge", ImportError, "cannot import 'no_such_module_xyz'"),
    ("megatron_latent.eval.answers:no_such", AttributeError, "has no 'no_such'"),
    ("megatron_latent.eval.answers:MAX_CHOICES", TypeError,
     "'MAX_CHOICES' is not callable \\(int\\)"),
])
def test_load_judge_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_judge(spec)
