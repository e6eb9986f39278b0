# The Vault/OpenBao policy for one agent run through `rotator exec --agent AGENT`: read that
# agent's keys, and nothing else (not another agent's, not rotator's own admin keys, no write).
#
# Replace AGENT with the agent's name, and the paths with where its credentials live (their
# `path` in rotation-policies.toml; KV v2 reads go through "<mount>/data/<path>"), then:
#   bao policy write agent-AGENT agent-policy.hcl
#   bao token create -policy=agent-AGENT -period=24h     (or an AppRole/Kubernetes role)
# The token needs Vault's default policy too (lookup-self and renew-self keep it alive).

path "secret/data/agents/AGENT/*" {
  capabilities = ["read"]
}
