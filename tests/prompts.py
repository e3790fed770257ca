"""Eight short, different chat prompts: what the benchmark sends and what the
batching tests decode together."""

PROMPTS = (
    "Write a haiku about llamas in the mountains.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for a good night's sleep.",
    "What is the capital of France, and what is it famous for?",
    "Describe a cup of coffee to someone who has never had one.",
    "List four animals that live in the ocean.",
    "Summarise the plot of Cinderella in a few sentences.",
    "Why do people keep llamas as pack animals?",
)
