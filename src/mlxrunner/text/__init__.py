"""Text shared by the LLM and the image pipelines' text encoders.

* :mod:`.tokenizer`: a model's ``tokenizer.json`` plus its special-token rules (BOS, EOS, raw token bytes);
* :mod:`.detokenizer`: token ids -> text while they are generated, one id at a time;
* :mod:`.stop`: stop strings over streamed text;
* :mod:`.chat_template`: a model's own chat template, rendered as transformers renders it;
* :mod:`.tool_calls`: model output -> content, reasoning and OpenAI tool calls (whole or streamed).
"""
