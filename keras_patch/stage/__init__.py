"""One KP_PATCH_STAGE op: its options (the spec, docs/patch_stage_op.md), patch geometry, the numpy reference executor and its int8 arithmetic."""
