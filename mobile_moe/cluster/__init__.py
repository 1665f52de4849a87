"""Engine replicas on Ray Serve behind one OpenAI endpoint (`mobile-moe serve --replicas N`): an application-level package beside the CLI."""
