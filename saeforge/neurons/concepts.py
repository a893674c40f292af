"""A small concept set written for saeforge (offline, no generator model): five concepts with sixteen sentences each,
the words that show each concept in a generation, and neutral sentences that show none.

Sentences were written by hand in the style of the paper's concept corpus (arXiv 2506.10920 uses LLM-written
sentences per concept); each concept's sentences name it in different ways and positions, so a feature must do more
than fire on one token to separate them. Even-indexed sentences select features, odd-indexed ones test them.
"""

from __future__ import annotations

CONCEPTS: dict[str, dict[str, list[str]]] = {
    "colours": {
        "keywords": ["red", "blue", "green", "yellow", "purple", "orange", "colour", "color", "colours", "colors",
                     "pink", "white", "black", "grey", "gray", "crimson", "scarlet"],
        "sentences": [
            "She painted the door a bright shade of red.",
            "The sky turned a deep blue after the storm.",
            "His favourite colour has always been green.",
            "The walls were yellow and the curtains were purple.",
            "Mix blue and yellow paint to make green.",
            "The leaves turn orange and red in autumn.",
            "She wore a pink dress with white shoes.",
            "The car was painted a dark metallic grey.",
            "Which colour do you like better, blue or green?",
            "The rainbow showed red, orange, yellow, green and violet.",
            "He chose a purple shirt and a black tie.",
            "The crimson flowers stood out against the green grass.",
            "Her eyes were a pale grey, almost silver.",
            "The flag is red and white with a blue star.",
            "They painted the kitchen a soft shade of yellow.",
            "The sunset filled the sky with orange and pink.",
        ],
    },
    "weekdays": {
        "keywords": ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "weekend", "week"],
        "sentences": [
            "The meeting has been moved to Monday morning.",
            "We always go swimming on Tuesday evenings.",
            "The shop is closed every Wednesday afternoon.",
            "Her flight leaves on Thursday at noon.",
            "On Friday night we ordered pizza and watched a film.",
            "The market is busiest on Saturday.",
            "They visit their grandparents every Sunday.",
            "I will call you back on Monday.",
            "The report is due next Wednesday.",
            "School starts again on Tuesday after the holiday.",
            "The concert was cancelled on Thursday evening.",
            "Let us meet for lunch on Friday.",
            "He sleeps late every Saturday and Sunday.",
            "The library opens at nine on weekdays and ten on Sunday.",
            "By Wednesday the snow had melted.",
            "The new film comes out this Friday.",
        ],
    },
    "animals": {
        "keywords": ["dog", "dogs", "cat", "cats", "horse", "horses", "bird", "birds", "cow", "cows", "sheep",
                     "lion", "tiger", "elephant", "fox", "wolf", "rabbit", "mouse", "animal", "animals"],
        "sentences": [
            "The dog barked at the mailman all morning.",
            "A small cat slept on the warm windowsill.",
            "The horse galloped across the open field.",
            "Birds were singing in the trees at dawn.",
            "The farmer milked the cows before sunrise.",
            "A fox crept quietly towards the chicken coop.",
            "The lion rested in the shade of a tree.",
            "An elephant can weigh more than a truck.",
            "The rabbit hid in the tall grass.",
            "Wolves hunt together in packs.",
            "The sheep grazed on the green hillside.",
            "A mouse ran under the kitchen table.",
            "The tiger watched the deer from the bushes.",
            "Our dog loves to chase the neighbour's cat.",
            "The zoo has lions, tigers and elephants.",
            "A flock of birds flew south for the winter.",
        ],
    },
    "food": {
        "keywords": ["bread", "cheese", "apple", "apples", "soup", "cake", "meat", "rice", "pasta", "fruit",
                     "butter", "eggs", "milk", "food", "eat", "ate", "dinner", "lunch", "breakfast", "pie"],
        "sentences": [
            "She baked fresh bread for breakfast.",
            "He cut a slice of cheese and an apple.",
            "The soup was hot and full of vegetables.",
            "We had chocolate cake after dinner.",
            "The chef cooked rice with spicy chicken.",
            "For lunch they ate pasta with tomato sauce.",
            "Butter the toast and add a fried egg.",
            "The market sells fruit, bread and fresh milk.",
            "Grandmother made an apple pie for the party.",
            "They grilled meat and potatoes over the fire.",
            "A bowl of warm porridge with honey is my breakfast.",
            "The restaurant serves fish and chips on Fridays.",
            "He spread jam on his bread and drank tea.",
            "The salad had lettuce, tomatoes and cheese.",
            "She ordered noodles and dumplings for dinner.",
            "We picked strawberries and ate them with cream.",
        ],
    },
    "weather": {
        "keywords": ["rain", "raining", "snow", "snowing", "wind", "windy", "storm", "sunny", "sun", "cloud",
                     "clouds", "cloudy", "weather", "thunder", "fog", "cold", "hot", "warm"],
        "sentences": [
            "It rained all day and the streets were flooded.",
            "Heavy snow fell during the night.",
            "A strong wind blew the leaves across the yard.",
            "The storm knocked out the power for hours.",
            "It was a sunny afternoon with no clouds.",
            "Thick fog covered the harbour in the morning.",
            "Thunder rolled over the hills before the rain.",
            "The weather forecast predicts a cold and windy week.",
            "Dark clouds gathered over the mountains.",
            "The sun came out after a week of rain.",
            "Hail damaged the crops in the valley.",
            "It is too hot to go outside at noon.",
            "The snow melted quickly in the warm sunshine.",
            "A cold drizzle fell all afternoon.",
            "Lightning flashed across the stormy sky.",
            "The wind howled around the house all night.",
        ],
    },
}

NEUTRAL: list[str] = [
    "The committee approved the new budget yesterday.",
    "He opened the letter and read it twice.",
    "The train arrived at the station on time.",
    "She studied mathematics at the university.",
    "The old bridge was repaired last year.",
    "They discussed the plan for an hour.",
    "The book explains how computers store information.",
    "He forgot his keys at the office.",
    "The lawyer asked the witness a question.",
    "She finished the puzzle in ten minutes.",
    "The company hired three new engineers.",
    "We walked to the end of the street and back.",
    "The museum reopened after the renovation.",
    "He writes short stories in his free time.",
    "The teacher handed out the exam papers.",
    "The bus was full, so we waited for the next one.",
    "The printer stopped working again.",
    "They moved to a bigger apartment in the city.",
    "The speech lasted almost an hour.",
    "She signed the contract with a silver pen.",
    "The results will be published next month.",
    "He carried the boxes up the stairs.",
    "The phone rang twice and then stopped.",
    "The students formed small groups to work.",
]

STEERING_PROMPTS: list[str] = ["I think that", "The man said", "In the morning", "She looked at the",
                               "Here is a short story:", "My friend told me"]


def split(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(selection, test): even- and odd-indexed sentences."""
    return sentences[0::2], sentences[1::2]
