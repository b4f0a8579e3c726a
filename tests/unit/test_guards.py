"""The guards against false semantic hits (proxy/guards.py): one test per guard class, the
examples of issue #25 among them, paraphrases that must pass, and symmetry as a property."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import guards
from proxy.guards import features, pack, refusal, unpack

KEY = b"g" * 32


def why(a: str, b: str) -> str | None:
    """The refusal of A against B, checked both ways and from the stored form."""
    fa, fb = features(a, KEY), features(b, KEY)
    found = refusal(fa, fb)
    assert refusal(fb, fa) == found
    assert refusal(unpack(pack(fa)), unpack(pack(fb))) == found
    return found


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2^10?", "What is 10^2?"),
        ("Is -40 degrees cold?", "Is 40 degrees cold?"),
        ("Add ½ cup of sugar", "Add ¼ cup of sugar"),
        ("Add 1/2 cup of sugar", "Add 1/4 cup of sugar"),
        ("What happened on 03/05/2021?", "What happened on 05/03/2021?"),
        ("Set an alarm for 2pm", "Set an alarm for 2am"),
        ("Set an alarm for 2 pm", "Set an alarm for 2 am"),
        ("Is 500 mg of vitamin C a day safe?", "Is 500 g of vitamin C a day safe?"),
        ("We raised $5M, is that a lot?", "We raised $5B, is that a lot?"),
        ("Is 40°F cold?", "Is 40°C cold?"),
        ("Summarise chapter 3", "Summarise chapter 4"),
        ("Who won the 3rd round?", "Who won the 4th round?"),
        ("Causes of World War I", "Causes of World War II"),
        ("What did Henry VIII do?", "What did Henry VII do?"),
        ("How far is 5 km?", "How far is 5 miles?"),
        ("Is 5k steps a day enough?", "Is 5M steps a day enough?"),
        ("What is 7 - 3?", "What is 3 - 7?"),
    ],
)
def test_numbers_are_compared_in_order_with_sign_units_and_form(a: str, b: str) -> None:
    """Numbers differing in order, sign, fraction, unit, suffix, ordinal, roman form, date or
    am/pm are refused by the numbers guard."""
    assert why(a, b) == "numbers"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Is 5k steps a day enough?", "Is 5,000 steps a day enough?"),
        ("Summarise the 3rd chapter", "Summarise the third chapter"),
        ("What is 17 and 25?", "what's seventeen and twenty-five"),
        ("Convert 100 USD to EUR", "How much is $100 in EUR?"),
        ("Boil it for 10 minutes?", "Should it boil for ten minutes?"),
        ("Is 2 pm too late for coffee?", "Is 2pm too late for coffee?"),
    ],
)
def test_the_same_numbers_written_otherwise_pass(a: str, b: str) -> None:
    """Digits, words, separators and suffixes that say the same number pass."""
    assert why(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Why does the build start?", "Why does the build fail to start?"),
        ("Warum startet der Server?", "Warum startet der Server nicht?"),
        ("¿Funciona en Linux?", "¿No funciona en Linux?"),
        ("Est-ce que ça marche?", "Est-ce que ça ne marche pas?"),
        ("Funziona con Python?", "Non funziona con Python?"),
        ("Это работает?", "Это не работает?"),
        ("这个可以用吗", "这个不可以用吗"),
        ("Is the museum open on Mondays?", "Is the museum never open on Mondays?"),
    ],
)
def test_negation_in_major_languages(a: str, b: str) -> None:
    """A negation in one text only (English, German, Spanish, French, Italian, Russian,
    Chinese, "fail to") is refused."""
    assert why(a, b) == "negation"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Is this film suitable for children?", "Is this film unsuitable for children?"),
        ("How do I archive a conversation?", "How do I unarchive a conversation?"),
        ("Is a careful driver cheaper to insure?", "Is a careless driver cheaper to insure?"),
        ("Is this behaviour legal?", "Is this behaviour illegal?"),
        ("Why is the data consistent?", "Why is the data inconsistent?"),
    ],
)
def test_affixes_negate_their_stem(a: str, b: str) -> None:
    """un-, in-, il-, -less and friends against the plain stem are refused."""
    assert why(a, b) in ("affix", "antonym")


def test_non_prefix_is_a_negation() -> None:
    """ "non-transferable" against "transferable" is refused."""
    assert why("Is the ticket transferable?", "Is the ticket non-transferable?") is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Is smoking allowed on the balcony?", "Is smoking banned on the balcony?"),
        ("Are drinks included in the price?", "Are drinks excluded from the price?"),
        ("How do I join a Slack channel?", "How do I leave a Slack channel?"),
        ("Is the gym busy at 6 in the morning?", "Is the gym quiet at 6 in the morning?"),
        ("What is the cheapest flight?", "What is the most expensive flight?"),
        ("How do I enable dark mode?", "How do I disable dark mode?"),
    ],
)
def test_antonym_pairs(a: str, b: str) -> None:
    """Lexicon antonyms on opposite sides are refused."""
    assert why(a, b) == "antonym"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("When is the best time to buy Bitcoin?", "When is the best time to sell Bitcoin?"),
        ("How do I import contacts?", "How do I export contacts?"),
        ("Should I eat before a run?", "Should I eat after a run?"),
        ("How do I upload a file?", "How do I download a file?"),
    ],
)
def test_direction_words(a: str, b: str) -> None:
    """buy/sell, import/export, before/after, upload/download on opposite sides are refused."""
    assert why(a, b) == "direction"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is the population of Canada?", "What is the population of China?"),
        ("What is the population of Austria?", "What is the population of Australia?"),
        ("Is Linux good for gaming?", "Is Windows good for gaming?"),
        ("Translate 'good morning' into French", "Translate 'good morning' into German"),
        ("How strong is the dollar?", "How strong is the euro?"),
        ("How do I install Kubernetes on Ubuntu?", "How do I install Kubernetes on Fedora?"),
    ],
)
def test_entities_products_currencies_and_languages(a: str, b: str) -> None:
    """A swapped country, product, currency or language is refused."""
    assert why(a, b) == "entity"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I migrate from MySQL to Postgres?", "How do I migrate from Postgres to MySQL?"),
        ("Convert USD to EUR", "Convert EUR to USD"),
        ("USD->EUR rate today", "EUR->USD rate today"),
        ("Is Canada bigger than Mexico?", "Is Mexico bigger than Canada?"),
        ("Move money from PayPal to my bank", "Move money from my bank to PayPal"),
        (
            "Copy the file from the laptop to the server",
            "Copy the file from the server to the laptop",
        ),
    ],
)
def test_entities_in_order_where_direction_matters(a: str, b: str) -> None:
    """The same entities the other way round, with a direction marker, are refused."""
    assert why(a, b) == "order"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Can I take ibuprofen with coffee?", "Can my elderly mother take ibuprofen with coffee?"),
        (
            "What's the baggage allowance in economy class?",
            "What's the baggage allowance in business class?",
        ),
        ("Does the free plan include SSO?", "Does the enterprise plan include SSO?"),
        (
            "Who pays for a broken boiler, the homeowner?",
            "Who pays for a broken boiler, the tenant?",
        ),
        ("How much chocolate is toxic for dogs?", "How much chocolate is toxic for cats?"),
        ("Is this recipe suitable for vegetarians?", "Is this recipe suitable for vegans?"),
    ],
)
def test_scope_who_and_which_plan(a: str, b: str) -> None:
    """Who or which plan or class the question is for differs: refused."""
    assert why(a, b) == "scope"


def test_language_of_the_question() -> None:
    """The same question in another language is refused (its answer is in another language)."""
    assert why("What is the capital of France?", "Quelle est la capitale de la France ?") == (
        "language"
    )
    assert why("What is the capital of France?", "Was ist die Hauptstadt von Frankreich?") in (
        "language",
        "entity",
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
        ("What is the capital of France?", "Tell me France's capital"),
        ("How do I undo the last commit in git?", "In git, how can I undo my last commit?"),
        ("Which one is better, vim or emacs?", "Which is better: vim or emacs?"),
        ("Give me a recipe for chocolate chip cookies", "Share a chocolate chip cookie recipe"),
        ("Is it rude not to tip in the US?", "Is not tipping rude in the US?"),
        ("How do I migrate from MySQL to Postgres?", "Steps to migrate MySQL to Postgres"),
        ("what is the capital of france", "What is the capital city of France?"),
    ],
)
def test_paraphrases_pass(a: str, b: str) -> None:
    """Paraphrases with the same numbers, polarity, entities and scope pass every guard."""
    assert why(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # antonyms no lexicon lists, in several languages
        ("How do I make my sauce thicker?", "How do I make my sauce thinner?"),
        (
            "What's the best way to gain weight healthily?",
            "What's the best way to lose weight healthily?",
        ),
        (
            "Which foods should I eat during pregnancy?",
            "Which foods should I avoid during pregnancy?",
        ),
        ("Which vaccines are required for Kenya?", "Which vaccines are optional for Kenya?"),
        ("¿Está permitido fumar en el hotel?", "¿Está prohibido fumar en el hotel?"),
        ("È consentito portare animali in spiaggia?", "È vietato portare animali in spiaggia?"),
        ("¿Qué alimentos aumentan el colesterol?", "¿Qué alimentos reducen el colesterol?"),
        # scope the lexicon lacks
        ("What taxes does a home buyer pay?", "What taxes does a home seller pay?"),
        ("How is overtime paid for hourly staff?", "How is overtime paid for salaried staff?"),
        ("What's the maternity leave policy?", "What's the paternity leave policy?"),
        ("Do part-time workers get holidays?", "Do full-time workers get holidays?"),
        (
            "What's the tuition for in-state students?",
            "What's the tuition for out-of-state students?",
        ),
        # lowercase entities
        ("How many players are on a soccer team?", "How many players are on a basketball team?"),
        ("What are the side effects of amoxicillin?", "What are the side effects of azithromycin?"),
        ("How do I make a margherita pizza?", "How do I make a pepperoni pizza?"),
        ("What is the speed of sound in water?", "What is the speed of sound in steel?"),
        ("How do I sort a list in C#?", "How do I sort a list in Go?"),
        # time without digits
        ("Le musée est-il ouvert le samedi ?", "Le musée est-il ouvert le dimanche ?"),
        ("Will it rain tomorrow in Oslo?", "Will it rain next week in Oslo?"),
    ],
)
def test_a_replaced_content_word_is_a_swap(a: str, b: str) -> None:
    """Nearly the same content words with one or two replaced on each side (a minimal pair)
    are refused by the swap guard, whatever the words and the language."""
    assert why(a, b) == "swap"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "Comment convertir des miles en kilomètres ?",
            "Comment convertir des kilomètres en miles ?",
        ),
        ("Is Mount Everest taller than K2?", "Is K2 taller than Mount Everest?"),
        ("Is Austria north of Italy?", "Is Italy north of Austria?"),
        ("How do I redirect HTTP to HTTPS in nginx?", "How do I redirect HTTPS to HTTP in nginx?"),
        ("Wie rechne ich Euro in Dollar um?", "Wie rechne ich Dollar in Euro um?"),
        ("Can a Mac run Windows apps?", "Can a Windows PC run Mac apps?"),
    ],
)
def test_the_same_words_crossing_an_order_marker(a: str, b: str) -> None:
    """The same content words on the other sides of an order marker (en, than, to, in, a
    direction word), or two of them trading places with no "and"/"between" to make the
    relation symmetric, are refused by the order guard."""
    assert why(a, b) == "order"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        # near repeats: typos, casing, punctuation, fillers, inflection
        ("How do I recieve a refund for my order?", "How do I receive a refund for my order?"),
        ("What is the capital of Peru", "whats the capital of peru??"),
        ("How do I fix a leaky faucet?", "Please, how do I fix a leaking faucet exactly?"),
        ("How do I clean a cast iron pan?", "How do I clean a cast-iron pan?"),
        ("What is a black hole?", "Explain what black holes are."),
        # the false refusals the evaluator found
        ("What is Newton's second law?", "What is Newtons second law?"),
        ("How do I make a pivot table?", "How do I make a pivot table in Excel?"),
        (
            "How does a bill become law in the United States?",
            "How does a bill become law in the US?",
        ),
        ("What are the symptoms of COVID-19?", "What are the symptoms of Covid 19?"),
        ("Why was I charged twice?", "Why was I charged two times?"),
        ("How do I set up two-factor authentication?", "How can I turn on 2FA?"),
        ("What is an electric car's range?", "How far can electric cars go on one charge?"),
        ("How much sleep does an adult need?", "How much sleep does a grown-up need?"),
        ("How do I treat a minor burn at home?", "How do I treat a minor burn?"),
        ("How do I unclog a sink without chemicals?", "How do I unclog a sink chemical-free?"),
        (
            "What's the difference between a Roth IRA and a traditional IRA?",
            "How does a traditional IRA differ from a Roth IRA?",
        ),
        (
            "Was ist der Unterschied zwischen Wetter und Klima?",
            "Wie unterscheiden sich Klima und Wetter?",
        ),
        ("I'd like to know how to make a budget.", "How do I create a personal budget?"),
        ("How do I contact customer support?", "What's the way to reach your support team?"),
        ("Who was the first person on the moon?", "Which astronaut first set foot on the moon?"),
    ],
)
def test_near_repeats_and_restatements_pass(a: str, b: str) -> None:
    """Typos, inflections, fillers, hyphens, apostrophes, a number word used as a word, an
    added place, and the rewordings the evaluator saw refused, pass every guard."""
    assert why(a, b) is None


def test_antonyms_clash_only_when_each_side_holds_its_own_pole() -> None:
    """ "slow ... faster" against "slow" is no clash: only a pole one side holds alone against
    the other pole the other side holds alone is."""
    a, b = "How can I speed up my slow Wi-Fi?", "My wifi is slow, how do I make it faster?"
    assert guards.antonym(features(a, KEY), features(b, KEY)) is False


def test_a_synonym_in_a_minimal_pair_is_refused() -> None:
    """The swap guard cannot tell a synonym from an antonym in a minimal pair: "undo" /
    "revert" is refused like "thicker" / "thinner" (the price of not serving traps)."""
    assert why("How do I undo a commit in git?", "How can I revert a commit in git?") == "swap"


def test_a_rewording_of_many_words_is_not_a_swap() -> None:
    """Three or more content words replaced on a side is a rewording, not a minimal pair."""
    a, b = "What causes the northern lights?", "Why does the aurora borealis glow in the night sky?"
    assert guards.swap(features(a, KEY), features(b, KEY)) is False


def test_every_guard_is_named_and_pure() -> None:
    """Each guard is its own function, listed under the name its refusal is logged by."""
    names = [name for name, _ in guards.GUARDS]
    assert len(names) == len(set(names))
    assert {"numbers", "negation", "affix", "antonym", "direction", "entity", "order"} <= set(names)
    assert {"scope", "language", "swap"} <= set(names)
    f = features("Is 5 mg not allowed in Canada for my mother?", KEY)
    for _, check in guards.GUARDS:
        assert check(f, f) is False


def test_features_hold_no_text() -> None:
    """The stored form holds digests, never a word of the text."""
    blob = pack(features("Does my grandmother's Medicare cover hearing aids in Ohio?", KEY))
    for word in (b"grandmother", b"Medicare", b"hearing", b"Ohio", b"medicare", b"ohio"):
        assert word not in blob


VOCABULARY = (
    "is are not no never the a of in to from into than I my mother tenant free enterprise "
    "plan economy business class Canada China USD EUR French German 5 40 -40 2pm 2am 500 mg g "
    "½ ¼ 2^10 10^2 03/05/2021 II IV suitable unsuitable allowed banned buy sell before after "
    "import export nicht pas не 不 transferable non-transferable careless care -> $5M $5B "
    "thicker thinner soccer basketball en miles kilomètres than K2 Everest recieve receive "
    "north Austria Italy in-state out-of-state samedi dimanche twice two times one COVID-19 "
    "vegans vegetarians maternity paternity Mac Windows run apps PC and between goldfish gold "
    "fish for-loop for loop ten-year-old year old 4G 5G vs first"
)
WORDS = st.sampled_from(VOCABULARY.split(" "))


@settings(max_examples=300, print_blob=True)
@given(st.lists(WORDS, max_size=12), st.lists(WORDS, max_size=12))
def test_refusals_are_symmetric(a: list[str], b: list[str]) -> None:
    """Every guard says of B against A what it says of A against B."""
    fa, fb = features(" ".join(a), KEY), features(" ".join(b), KEY)
    for name, check in guards.GUARDS:
        assert check(fa, fb) == check(fb, fa), name
    assert refusal(fa, fb) == refusal(fb, fa)


@settings(max_examples=200, print_blob=True)
@given(st.text(max_size=300), st.text(max_size=300))
def test_any_text_is_read_and_stored(a: str, b: str) -> None:
    """Any text gives features that round-trip through the stored form, symmetrically."""
    fa, fb = features(a, KEY), features(b, KEY)
    assert unpack(pack(fa)) == fa
    assert refusal(fa, fb) == refusal(fb, fa)
    assert refusal(fa, fa) is None


def test_the_stored_form_is_bounded_for_any_text() -> None:
    """8000 characters of distinct names, negated words and from/to pairs keep a stored form
    of a few KiB (words, entities, stems and ends are capped)."""

    def name(i: int) -> str:
        return "".join("abcdefghijklmnopqrstuvwxyz"[int(d)] for d in f"{i:04d}")

    words = [f"X{name(i)} un{name(i)}ed from {name(i)}a to {name(i)}b" for i in range(400)]
    text = " ".join(words)[:8000]
    blob = pack(features(text, KEY))
    assert len(blob) <= 4096
    assert unpack(blob) == features(text, KEY)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What's a good gift for a ten year old?", "What's a good gift for a ten-year-old?"),
        ("What is the half-life of caffeine?", "What is the half life of caffeine?"),
        (
            "How do I set up two factor authentication?",
            "How do I set up two-factor authentication?",
        ),
        ("Plan a two week road trip", "Plan a two-week road trip"),
        ("Is a 10-minute walk enough?", "Is a 10 minute walk enough?"),
        ("Gift for a twenty-five-year-old?", "Gift for a twenty five year old?"),
    ],
)
def test_hyphens_do_not_change_the_numbers(a: str, b: str) -> None:
    """A number word or number hyphenated to the next word reads as the same number spaced."""
    assert why(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (
            "How do I set up two-factor authentication?",
            "How do I set up three-factor authentication?",
        ),
        ("Is this movie in 2D?", "Is this movie in 3D?"),
        ("What's a good gift for a ten-year-old?", "What's a good gift for a two-year-old?"),
    ],
)
def test_a_number_in_a_compound_still_counts(a: str, b: str) -> None:
    """A number hyphenated or glued to a word (two-factor, 3D) is still compared."""
    assert why(a, b) == "numbers"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is the difference between 4G and 5G?", "How does 5G differ from 4G?"),
        ("Is 5 mg or 10 mg better?", "Is 10 mg or 5 mg better?"),
        ("first vs second amendment", "second vs first amendment"),
        (
            "I owe back taxes, what do I do first?",
            "I owe back taxes, what is the first thing to do?",
        ),
        ("How do I start a garden?", "What is the first step to start a garden?"),
    ],
)
def test_numbers_joined_by_a_symmetric_word_are_a_set(a: str, b: str) -> None:
    """Numbers directly around "and", "or", "vs", "differ from" may come in either order,
    and "first" meaning "to begin with" is no ordinal."""
    assert guards.numbers(features(a, KEY), features(b, KEY)) is False


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("What is 2^10?", "What is 10^2?"),
        ("Is 2^10 bigger than 10^2?", "Is 10^2 bigger than 2^10?"),
        ("What happened on 03/05/2021?", "What happened on 05/03/2021?"),
        ("Flights on June 3 and July 5", "Flights on June 5 and July 3"),
        ("first vs second amendment", "first vs third amendment"),
        ("What is the first step in making bread?", "What is the second step in making bread?"),
        ("Take 5 mg then 10 mg", "Take 10 mg then 5 mg"),
    ],
)
def test_ordered_numbers_stay_ordered(a: str, b: str) -> None:
    """Operators, dates, numbers not directly around a symmetric word keep their order."""
    assert guards.numbers(features(a, KEY), features(b, KEY)) is True


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Who came first in the race?", "Who came last in the race?"),
        ("What is the first step in making bread?", "What is the last step in making bread?"),
    ],
)
def test_first_as_a_word_still_clashes_with_last(a: str, b: str) -> None:
    """ "first" read as "to begin with" or as an ordinal is still refused against "last"."""
    assert why(a, b) in ("swap", "numbers")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How do I write a for loop in Rust?", "How do I write a for-loop in Rust?"),
        ("How often should I feed my goldfish?", "How often should I feed my gold fish?"),
        ("How do I clean a cast iron skillet?", "How do I clean a castiron skillet?"),
    ],
)
def test_a_compound_is_the_same_word_as_its_two_parts(a: str, b: str) -> None:
    """A word written as one on one side and as two adjacent words on the other is no swap."""
    assert why(a, b) is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("How often should I feed my goldfish?", "How often should I feed my gold bar?"),
        ("How do I write a for-loop in Rust?", "How do I write a while loop in Rust?"),
    ],
)
def test_a_compound_against_other_words_is_still_a_swap(a: str, b: str) -> None:
    """Only the two parts that make the compound are matched: other words are a swap."""
    assert why(a, b) == "swap"
