"""The offline API on the real default model."""

from tokenmill import LLM, SamplingParams


def test_llm_chat_and_generate_on_the_default_model(smollm_loaded):
    llm = LLM(loaded=smollm_loaded)
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=20),
    )[0]
    assert "Paris" in answer.outputs[0].text
    assert answer.outputs[0].finish_reason == "stop"
    assert answer.metrics.ttft is not None and answer.metrics.e2e_latency >= answer.metrics.ttft
    outputs = llm.generate(
        ["Once upon a time", [504, 3575, 282, 4649, 314]], SamplingParams(temperature=0, max_tokens=5)
    )
    assert outputs[0].prompt == "Once upon a time"
    assert outputs[1].prompt is None and outputs[1].prompt_token_ids == [504, 3575, 282, 4649, 314]
    assert all(len(o.outputs[0].token_ids) == 5 for o in outputs)
