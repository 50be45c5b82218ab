"""Offline speculative-acceptance evaluation of an MTP head (``verl-mtp accept-eval``).

Given a Hugging Face checkpoint with an MTP head and prompts+responses, the model runs
teacher-forced over each prompt+response in megatron-core, and every response position is
scored as a speculative-decoding *anchor*, as an engine would draft from it:

* megatron indexing (``verl_mtp.megatron.mtp_log_probs``): the main head at index i predicts
  ``x[i+1]``; MTP depth k at index i predicts ``x[i+k+1]`` from the depth k-1 (or trunk) hidden
  state at i and the embedding of ``x[i+k]``.
* a verify step that has just committed ``x[i+1]`` drafts K tokens: draft position j (1..K) is
  MTP depth j at index i, proposing ``x[i+j+1]``; the target that verifies it is the main head at
  index i+j. Anchors run from the last prompt token (the first decode step after prefill) to the
  third-to-last token, so every drafted token is a response token.
* teacher forcing: later draft positions are fed the data's tokens, not drafted ones. Under the
  chain rule (a position counts only if all earlier ones were accepted) an accepted draft equals
  the data's token when the responses are greedy outputs of this model; for sampled rollouts
  the acceptance is measured along the data's own trajectories, and multiplying per-position
  acceptances is the usual independence approximation of the speculative-sampling analysis.

Acceptance of one draft position, per anchor, with p the target and q the draft distribution:

* ``greedy``: argmax q == argmax p (greedy decoding; draft and target both take the argmax).
* ``sampled`` at temperature T: sum_v min(p_T(v), q_T(v)), the probability that speculative
  sampling (draft sampled from q_T, accepted with min(1, p_T/q_T)) keeps the draft.
* ``argmax_draft`` at temperature T: p_T(argmax q), the probability that the target keeps a
  greedily drafted token under the same rejection rule with a one-hot draft distribution, which
  is how vLLM's v1 rejection sampler treats MTP drafts (it is given no draft probabilities).

Reported per draft position j (which is MTP depth j where the head has that many depths):
``marginal`` = mean acceptance of position j over anchors (the depth's own quality),
``conditional`` = acceptance of j given 1..j-1 accepted; and for K = 1..K_max the expected number
of accepted drafts E[sum_{j<=K} prod_{i<=j} a_i] and tokens per verify step (1 + that, the
engines' "acceptance length"). An anchor enters position j (and K) only if ``x[i+j+1]`` lies
inside the response, so the end of a response never counts as a rejection.

Heads with fewer depths D than K: vLLM runs MTP layer ``step % D`` at draft step ``step`` and
SGLang / megatron's ``mtp_use_repeated_layer`` repeat the single layer, so draft position j uses
layer ``(j-1) % D``, fed with the previous position's output hidden state and the next
embedding, exactly as megatron's MTP block chains its depths (the layer forward is megatron's own).
That output hidden state is the one after the layer's final norm, as in megatron's training
chain, vLLM's MiMo MTP layer and SGLang's NextN layers; an engine that passed the pre-norm state
on would differ from this estimate at positions beyond the head's depth count.

Not modelled: top-p / top-k truncation, tree drafting (SGLang topk > 1), and the change of the
conditioning prefix in sampling mode (see teacher forcing above). Text inputs are re-tokenized;
verl's rollout dump decodes with ``skip_special_tokens=True``, so token ids are the exact input.

The steps, one module each: ``options`` (the error class and option checks), ``samples`` (reading
the JSONL), ``acceptance`` (the acceptance of one draft position and the chain-rule aggregation),
``scoring`` (the teacher-forced megatron-core forward and per-anchor scores), ``context`` (each
draft position's acceptance by context length: the drafted token's index in prompt+response, in
buckets, with standard errors), ``run`` (the whole evaluation of a checkpoint) and ``report`` (the
tables and the plot).
"""
