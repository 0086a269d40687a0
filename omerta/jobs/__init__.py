"""
Compute jobs on a provider.

L{omerta.jobs.runner} defines what running one job means (L{Limits},
L{RunRequest}, L{RunResult}, L{RunningJob}, L{IJobRunner});
L{omerta.jobs.sandbox.SandboxRunner} runs a job in bubblewrap with cgroup
limits (L{omerta.jobs.cgroups}).  See docs/jobs-sandbox.md.
"""
