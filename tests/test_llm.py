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


def test_text_decoded_at_the_end_equals_the_streamed_text(smollm_loaded):
    """Without stop strings the offline path decodes a sequence's text once it finishes; a streaming caller
    gets it step by step. Both must be the tokens' text, and a stop string still cuts it where it appears."""
    prompts = ["Once upon a time", "The three laws of motion are", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = LLM(loaded=smollm_loaded)
    offline = llm.generate(prompts, params)
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, params)
    streamed = {f"s{i}": "" for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            streamed[output.request_id] = output.outputs[0].text  # the whole text so far, each step
    tokenizer = smollm_loaded.tokenizer
    for i, output in enumerate(offline):
        ids = output.outputs[0].token_ids
        assert output.outputs[0].text == streamed[f"s{i}"] == tokenizer.decode(ids)
    word = offline[0].outputs[0].text.split()[3]
    cut = llm.generate(
        prompts[:1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[word])
    )
    text = cut[0].outputs[0].text
    assert word not in text and offline[0].outputs[0].text.startswith(text)
