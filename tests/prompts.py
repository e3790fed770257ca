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

#: Eight tasks whose answer copies much of the prompt (correcting, reformatting, extracting): where
#: drafting from the prompt (``LLAMAS_DRAFT_TOKENS``) should pay. ``python -m tests.bench.compare --prompts rewrite``.
REWRITES = (
    "Correct the spelling in this text and repeat it:\nThe llama is a domestcated South American camelid, "
    "widely used as a meat and pack animal by Andean cultures since the pre-Columbian era.",
    "Repeat this list, one item per line, in capital letters:\napples, pears, plums, cherries, grapes, lemons, "
    "oranges, peaches",
    "Turn this into JSON with the keys name, city and age for each person:\nAnna, Paris, 31; Ben, Rome, 45; "
    "Carla, Oslo, 27; Dan, Lima, 38",
    "Fix the grammar and repeat the sentence:\nThe herd of llamas were walking slow across the mountain "
    "pass when the snow begun to fall on they.",
    "Copy this address exactly, then write it again on one line:\nMaria Lopez\n12 Harbour Street\n"
    "Valparaiso 2340000\nChile",
    "Rewrite this text with every sentence on its own line:\nLlamas are social. They live in herds. Their "
    "wool is soft. They can carry packs. They hum to each other.",
    "Extract every word that starts with a capital letter from this text, in order:\nIn Peru and Bolivia, "
    "Andean farmers keep Llamas and Alpacas near Lake Titicaca and the city of Cusco.",
    "Repeat the following code and add a comment above each line:\nx = 1\ny = x + 2\nprint(x * y)\n"
    "z = [x, y]\nprint(len(z))",
)
