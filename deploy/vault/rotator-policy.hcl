# Vault / OpenBao policy for the rotator daemon: the least it needs, nothing more.
#
# Layout it assumes (change the paths, not the capabilities, to fit yours):
#   secret/                   the KV version 2 mount    ([vaults.NAME] mount = "secret")
#   secret/agents/...         the secrets rotator rotates ([[credentials]] path = "agents/...")
#   secret/rotator/admin/...  provider admin keys, read only (admin_key = { vault, path, field })
#   secret/rotator/pending/.. new keys staged before they go live ([vaults.NAME] staging_path)
#
# Install:  bao policy write rotator rotator-policy.hcl   (or: vault policy write ...)
# tests/test_vault_policy.py runs the daemon against OpenBao with a token holding exactly this
# policy (and not Vault's "default" policy), and checks that every stanza below is needed.

# The managed secrets: read the current version and earlier ones (a rollback restores the old
# key from its version), write new versions with check-and-set ("create" for a secret that does
# not exist yet, "update" for one that does).
path "secret/data/agents/*" {
  capabilities = ["create", "read", "update"]
}

# Each rotated field's key id, rotation id and time, kept in the secret's custom metadata and
# written as a JSON merge patch so credentials sharing a secret never erase each other's
# records. Vault before 1.9 has no "patch": grant ["read", "update"] there instead.
path "secret/metadata/agents/*" {
  capabilities = ["patch"]
}

# A new key is staged here before it becomes current, so a crash between the provider creating
# it and the vault storing it never leaves a live key only in process memory.
path "secret/data/rotator/pending/*" {
  capabilities = ["create", "read", "update"]
}

# Staged keys are deleted, with all their versions, once promoted or discarded.
path "secret/metadata/rotator/pending/*" {
  capabilities = ["delete"]
}

# Provider admin keys, with which rotator creates and revokes the agents' keys. Read only:
# rotator never writes them.
path "secret/data/rotator/admin/*" {
  capabilities = ["read"]
}

# The start-up check and `rotator check --online` confirm the token is valid. (sys/health needs
# no policy; the mount's type is looked up through sys/internal/ui/mounts, which answers for any
# mount the token can use.)
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# The daemon keeps its own token alive (as Vault Agent does): a token given by token_env or
# token_file is renewed once less than half of its TTL is left, so a periodic token never
# expires while rotator runs. The start-up check renews it once to prove it can.
path "auth/token/renew-self" {
  capabilities = ["update"]
}
