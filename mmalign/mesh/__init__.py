"""Meshes: file IO and validation (`io`), surface sampling (`sampling`, `points`), the embedded mesh world
(`world`, `embedded`), mesh sets (`data`), the reward network (`encoder`), RewardCS and its Bradley–Terry
baseline (`reward_training`, `reward_cs`, `reward_bt`) and the trained reward (`reward`)."""
