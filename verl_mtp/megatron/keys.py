"""The entries verl-mtp's MTP forward adds to verl's ``model_output``, by name.

The forward (``verl_mtp.megatron.mtp_forward``) writes them and the actor loss (``verl_mtp.loss``)
reads them; both import the names from here. verl un-packs each entry exactly like ``log_probs``
(THD or BSHD, context-parallel gather), so per sequence it is [tokens, K] in megatron's indexing:

    MTP_LOG_PROBS_KEY  [t, k-1] = log q_k(input_ids[t+k+1])        (mtp_loss_type=rl only)
    MTP_VALID_KEY      [t, k-1] = that label lies inside the sequence (float 0/1)
    MTP_AGREE_KEY      [t, k-1] = depth k's argmax is that label     (float 0/1, both loss types)
"""

MTP_LOG_PROBS_KEY = "mtp_log_probs"
MTP_VALID_KEY = "mtp_valid"
MTP_AGREE_KEY = "mtp_agree"
