"""Guards against false semantic hits: what text B adds or drops against text A. Pure.

Embeddings put "is X suitable" and "is X unsuitable", "from MySQL to Postgres" and "from
Postgres to MySQL", "500 mg" and "500 g" next to each other. A candidate that clears the
similarity threshold must also pass every guard below; each is its own function over two
`Features` and names its refusal:

- `numbers`: the numbers in order, with sign, operators (2^10 is not 10^2), fractions (½),
  units and suffixes (500 mg, 5k, $5M, 40 °F, 2pm), ordinals, roman numerals (World War II),
  dates (03/05/2021) and times;
- `negation`: as many negations (not, n't, never, without, fail to; nicht, pas, no, não,
  non, niet, не, 不, ない, 안, नहीं, لا, ...);
- `affix`: a word negated by an affix in one text (unsuitable, non-transferable, careless,
  unarchive) whose stem stands plain in the other;
- `antonym`: a pair from the antonym lexicon (allow/ban, included/excluded, join/leave,
  busy/quiet, cheapest/most expensive, ...) on opposite sides;
- `direction`: direction words on opposite sides (buy/sell, import/export, before/after,
  upload/download, ...);
- `entity`: a named entity, product, currency or language in one text that the other lacks
  (Canada/China, Linux/Windows, "into French"/"into German", USD/EUR);
- `order`: the entities both share, in another order, when either text has a direction
  marker (from, to, into, than, ->): USD->EUR is not EUR->USD;
- `scope`: who or which plan or class it is for (myself / my elderly mother, economy /
  business class, free / enterprise plan, homeowner / tenant);
- `language`: the texts are written in two different languages (an answer in English is not
  the answer to a question asked in German).

Every guard is symmetric: `refusal(a, b) == refusal(b, a)`.

`features(text, key)` keeps only keyed 4-byte digests of words (never the text), so the
index can hold them (`pack` / `unpack`) and compare a stored candidate without its text.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


WORDS_MAX = 256
"""Distinct words kept per text for the affix and entity guards (longer texts keep the first)."""
MARKS_MAX = 64
"""Entities, negated stems and from/to words kept per text (the stored form stays small)."""
VERSION = 3


@dataclass(frozen=True, slots=True)
class Features:
    """What the guards compare, as keyed digests (ints): never the text."""

    numbers: int
    """Digest of the numbers in order (0: none)."""
    negations: int
    words: frozenset[int]
    """Every word (lower case) and every entity's canonical name."""
    negated: frozenset[int]
    """Stems negated by an affix (unsuitable -> suitable)."""
    poles: frozenset[tuple[int, int, int]]
    """(lexicon group, pole +1/-1, kind 0 antonym / 1 direction)."""
    entities: tuple[int, ...]
    """Named entities, products, currencies and languages, in order, first occurrence each."""
    scope: frozenset[int]
    directed: bool
    """A direction marker is present (from, to, into, than, ->)."""
    roles: frozenset[tuple[int, int]]
    """(word, 1 after "from" / 2 after "to", "into", "onto"): the ends of a move."""
    language: str
    """"en", "de", ..., a script name ("cyrillic", "han", ...) or "" when unsure."""
    content: tuple[int, ...] = ()
    """Content words (stop and filler words, negations and numbers left out), stemmed, in
    order, first occurrence each."""
    typos: tuple[tuple[int, ...], ...] = ()
    """Per content word: 16-bit digests of it and of each of its one-letter deletions (words
    of TYPO_MIN letters or more; else empty): two words one typo apart share one."""
    marks: tuple[tuple[int, int], ...] = ()
    """(order marker, content words before it): than, to, into, from, en, nach, que, als, ->."""
    paired: bool = False
    """A word that makes a relation symmetric is present (and, or, between, with, differ,
    compare; und, et, y, e, o, tra...): its two sides may come in any order."""
    joins: tuple[tuple[int, int, int], ...] = ()
    """(two adjacent words written as one, stemmed; the index in `content` of each, 255 when
    not a content word): "gold fish" holds goldfish, "for loop" forloop."""


# ---------------------------------------------------------------- lexicons


def _table(spec: str) -> dict[str, str]:
    """'canon: alias alias; canon2: ...' -> {alias: canon} (every canon maps to itself)."""
    out: dict[str, str] = {}
    for group in spec.split(";"):
        canon, _, aliases = group.partition(":")
        canon = canon.strip()
        if not canon:
            continue
        out[canon] = canon
        for alias in aliases.split():
            out[alias] = canon
    return out


NEGATIONS = _wordset(
    """not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt
    didnt isnt arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt mustnt
    neednt aint shant nope fail fails failed failing unable refuse refuses refused
    nicht kein keine keinen keinem keiner keines nie niemals nichts ohne weder
    ne pas jamais sans aucun aucune rien
    nunca jamás sin ningún ninguna ninguno nada nadie tampoco ni
    não nao sem nenhum nenhuma ninguém nem
    non mai senza nessuno nessuna niente nulla né
    niet geen nooit zonder niets niemand
    inte ej aldrig utan ingen inget inga ikke aldri
    nie nigdy bez żaden żadna
    не нет никогда без ни ничего никто ні
    değil yok hiç asla
    नहीं मत बिना
    لا لم لن ليس بدون غير
    לא אין בלי
    """
)
NEGATION_CHARS = ("不", "没", "沒", "別", "别", "無", "无", "未", "非")
NEGATION_KANA = ("ない", "ません", "なく", "ず")
NEGATION_HANGUL = ("안", "않", "못", "없")

# antonyms: "group: +words / -words"
_ANTONYMS = """
allow: allow allows allowed allowing permit permits permitted permitting legal lawful
  / ban bans banned banning forbid forbids forbidden prohibit prohibits prohibited illegal
include: include includes included including inclusive / exclude excludes excluded excluding
  exclusive
join: join joins joined joining / leave leaves leaving quit quits quitting
busy: busy busiest crowded peak / quiet quietest empty offpeak
true: true / false
safe: safe safer safest / dangerous unsafe risky harmful
good: good better best / bad worse worst
pros: pros advantages benefits / cons disadvantages drawbacks downsides
cheap: cheap cheaper cheapest inexpensive affordable / expensive pricier priciest costly
fast: fast faster fastest quick quicker quickest / slow slower slowest
big: big bigger biggest large larger largest huge / small smaller smallest tiny little
high: high higher highest tall taller tallest / low lower lowest short shorter shortest
hot: hot hotter hottest warm warmer warmest / cold colder coldest cool cooler coolest
more: more most / less least fewer fewest
max: max maximum / min minimum
strong: strong stronger strongest / weak weaker weakest
easy: easy easier easiest simple / hard harder hardest difficult
old: old older oldest / new newer newest young younger youngest
early: early earlier earliest / late later latest
long: long longer longest / brief
heavy: heavy heavier heaviest / light lighter lightest
rich: rich richer richest wealthy / poor poorer poorest
win: win wins won winning / lose loses lost losing
accept: accept accepts accepted approve approves approved / reject rejects rejected deny denies
  denied decline declined
enable: enable enables enabled / disable disables disabled
open: open opens opened opening / close closes closed closing shut
start: start starts started starting begin begins / stop stops stopped stopping end ends
show: show shows shown visible / hide hides hidden invisible
public: public / private
online: online / offline
positive: positive / negative
profit: profit profits gain gains / loss losses
like: like likes love loves / hate hates dislike dislikes
agree: agree agrees / disagree disagrees
happy: happy / sad unhappy
alive: alive living / dead
odd: odd / even
male: male men man boys boy / female women woman girls girl
summer: summer / winter
day: day daytime / night nighttime
morning: morning / evening
sunrise: sunrise / sunset
input: input inputs / output outputs
add: add adds added adding / remove removes removed removing delete deletes deleted
wet: wet / dry
sweet: sweet / sour
raw: raw / cooked
married: married / single divorced
full: full / empty
healthy: healthy / unhealthy
awake: awake / asleep
maximize: maximize maximise / minimize minimise
success: success successful / failure
login: login log-in signin / logout log-out signout
"""
_DIRECTIONS = """
buy: buy buys buying bought purchase / sell sells selling sold
import: import imports importing imported / export exports exporting exported
upload: upload uploads uploading uploaded / download downloads downloading downloaded
send: send sends sending sent / receive receives receiving received
push: push pushes pushing / pull pulls pulling
before: before prior / after
above: above over / below under beneath
increase: increase increases increasing increased raise raising grow / decrease decreases
  decreasing decreased reduce reducing lower lowering shrink
upgrade: upgrade upgrades upgrading / downgrade downgrades downgrading
encrypt: encrypt encrypts encrypting encrypted encode encoding / decrypt decrypts decrypting
  decrypted decode decoding
compress: compress compressing compressed zip / decompress decompressing decompressed unzip
lend: lend lends lending lent / borrow borrows borrowing borrowed
deposit: deposit deposits / withdraw withdraws withdrawal
credit: credit credits / debit debits
inbound: inbound incoming ingress / outbound outgoing egress
ascending: ascending asc / descending desc
north: north northern / south southern
east: east eastern / west western
left: left / right
forward: forward forwards / backward backwards
arrive: arrive arrives arrival arrivals / depart departs departure departures
hire: hire hiring hired / fire firing fired
rise: rise rises rising / fall falls falling
"""


def _poles(spec: str, kind: int) -> dict[str, tuple[str, int, int]]:
    out: dict[str, tuple[str, int, int]] = {}
    for line in spec.strip().split("\n"):
        if not line.strip():
            continue
        if not line.startswith(" "):
            group, _, rest = line.partition(":")
            current = (group.strip(), rest)
        else:
            current = (current[0], current[1] + " " + line)
        plus, _, minus = current[1].partition("/")
        for w in plus.split():
            out[w] = (current[0], 1, kind)
        for w in minus.split():
            out[w] = (current[0], -1, kind)
    return out


POLES = {**_poles(_ANTONYMS, 0), **_poles(_DIRECTIONS, 1)}
NEGATIVE_PREFIXES = ("non", "un", "in", "im", "il", "ir", "dis")
NEGATIVE_SUFFIXES = ("less",)
_TO_MARKERS = frozenset({"to", "into", "onto", "towards"})
_DETERMINERS = _wordset("the a an my your our their his her its this that these those some")
DIRECTION_MARKERS = frozenset({"from", "to", "into", "than", "towards", "onto", "versus_no"})

ENTITIES = _table(
    """
usa: us usa america united-states american americans; uk: britain british england english-uk
  gb; canada: canadian; china: chinese-china prc; mexico: mexican; brazil: brazilian;
argentina; chile; peru; colombia; germany: deutschland german-country; france: french-country;
spain: españa; portugal; italy: italia; netherlands: holland dutch-country; belgium; austria:
austrian; switzerland: swiss; sweden: swedish-country; norway; denmark; finland; poland; greece;
ireland: irish; russia: russian-country; ukraine; turkey: türkiye; egypt; israel; iran; iraq;
india: indian; pakistan; japan: japanese-country; korea: korean-country; vietnam; thailand;
indonesia; philippines; australia: australian; zealand; nigeria; kenya; africa: african; europe:
european; asia: asian; singapore; malaysia; hungary; czechia; romania; morocco; saudi; qatar;
english; french; german; spanish; portuguese; italian; dutch; swedish; norwegian; danish;
finnish; polish; russian; ukrainian; turkish; arabic; hebrew; hindi; urdu; bengali; chinese:
mandarin cantonese; japanese; korean; vietnamese; thai; indonesian; greek; latin;
usd: dollar dollars $ us$; eur: euro euros €; gbp: pound-sterling sterling £; jpy: yen ¥;
cny: yuan renminbi rmb; inr: rupee rupees ₹; cad; aud; chf: franc francs; mxn: peso pesos;
brl: real-currency; btc: bitcoin; eth: ethereum;
linux; ubuntu; debian; fedora; windows; macos: osx mac; ios; android;
mysql; postgres: postgresql psql; sqlite; mongodb: mongo; redis; oracle; mariadb; cassandra;
python; java; javascript: js node nodejs; typescript: ts; rust; golang: go-lang; ruby; php;
kotlin; swift; scala; haskell; perl; csharp: c#; cpp: c++;
aws: amazon-web-services; azure; gcp; docker; kubernetes: k8s; terraform; react; vue; angular;
django; flask; rails; spring; excel; sheets; slack; zoom; teams; jira; github; gitlab;
bitbucket; npm; pip; yarn; git; svn; vim; emacs; vscode;
apple; google; microsoft; amazon; meta: facebook; tesla; netflix; openai; anthropic; samsung;
iphone; ipad; pixel; galaxy; kindle; chrome; firefox; safari; edge-browser;
january: jan; february: feb; march-month; april: apr; may-month; june: jun; july: jul;
august: aug; september: sep sept; october: oct; november: nov; december: dec;
monday; tuesday; wednesday; thursday; friday; saturday; sunday;
paris; london; berlin; madrid; rome; tokyo; beijing; shanghai; delhi; mumbai; sydney;
melbourne; toronto; vancouver; boston; chicago; seattle; york; angeles; francisco; vienna;
amsterdam; dublin; lisbon; prague; warsaw; moscow; istanbul; dubai; cairo; seoul; bangkok;
celsius; fahrenheit; kelvin;
"""
)
_ENTITY_BIGRAMS = {
    ("united", "states"): "usa",
    ("united", "kingdom"): "uk",
    ("new", "york"): "york",
    ("new", "zealand"): "zealand",
    ("south", "korea"): "korea",
    ("los", "angeles"): "angeles",
    ("san", "francisco"): "francisco",
    ("saudi", "arabia"): "saudi",
}
SCOPE = _table(
    """
mother: mom mum mommy mama mothers; father: dad daddy papa fathers; parent: parents;
child: children kid kids son sons daughter daughters toddler toddlers; baby: babies infant
infants newborn; teen: teenager teenagers teens adolescent; grandparent: grandma grandmother
grandpa grandfather grandparents; spouse: wife husband partner; sibling: brother sister
siblings; friend: friends; elderly: senior seniors older-adult aged; pregnant: pregnancy
pregnancies; dog: dogs puppy puppies; cat: cats kitten kittens; employee: employees
worker workers staff; employer: employers boss; landlord: landlords; tenant: tenants renter
renters; homeowner: homeowners; student: students; teacher: teachers; patient: patients;
everyone: everybody;
minor: minors; adult: adults grownup grownups; guest: guests visitor visitors;
admin: admins administrator
administrators; contractor: contractors freelancer freelancers; resident: residents
citizen citizens; nonresident: nonresidents foreigner foreigners tourist tourists;
veteran: veterans; diabetic: diabetics diabetes; vegan: vegans; vegetarian: vegetarians;
beginner: beginners novice; expert: experts advanced;
free: freemium; basic: starter; pro: professional; plus; premium; team: teams-plan;
business; enterprise: enterprises; trial; family; economy: coach; first-class; standard;
personal; individual;
"""
)
_SCOPE_SKIP_IF_ENTITY = frozenset({"teams"})

LANG_WORDS: dict[str, frozenset[str]] = {
    "en": _wordset("the is are what how why when which who do does can should and of to in for"),
    "de": _wordset("der die das ist sind was wie warum wann welche wer und ich nicht ein eine mit für"),  # noqa: E501
    "fr": _wordset("le la les est sont que quoi comment pourquoi quand quel quelle et je une des du avec pour"),  # noqa: E501
    "es": _wordset("el la los las es son qué cómo por cuándo cuál quién y yo una con para del"),
    "pt": _wordset("o os as é são que como por quando qual quem e eu uma com para do da não"),
    "it": _wordset("il lo gli è sono che come perché quando quale chi e io una con per del della"),
    "nl": _wordset("de het is zijn wat hoe waarom wanneer welke wie en ik een met voor van niet"),
}  # fmt: skip
_AMBIGUOUS_LANG_WORDS = frozenset({"e", "de", "la", "a", "o", "is", "die", "con"})
_LANG_OF: dict[str, tuple[str, ...]] = {}
for _lang, _vocab in LANG_WORDS.items():
    for _word in _vocab - _AMBIGUOUS_LANG_WORDS:
        _LANG_OF[_word] = (*_LANG_OF.get(_word, ()), _lang)

# ---------------------------------------------------------------- numbers

UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18,
    "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
    "seventy": 70, "eighty": 80, "ninety": 90, "dozen": 12, "first": 1, "second": 2,
    "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8, "ninth": 9,
    "tenth": 10, "half": 0.5, "quarter": 0.25, "twice": 2, "thrice": 3, "once": 1,
    "double": 2, "triple": 3,
}  # fmt: skip
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_SCALE_VALUES = frozenset(float(v) for v in SCALES.values())
MULTIPLIERS = {"k": 1e3, "K": 1e3, "M": 1e6, "mm": 1e6, "mn": 1e6, "b": 1e9, "B": 1e9}
MULTIPLIERS |= {"bn": 1e9, "t": 1e12, "T": 1e12, "tn": 1e12}
UNIT_NAMES = _table(
    """
mg: milligram milligrams; g: gram grams gr; kg: kilogram kilograms kilo kilos; lb: lbs pound
pounds; oz: ounce ounces; ton: tons tonne tonnes; ml: milliliter milliliters millilitre
millilitres; l: liter liters litre litres; gal: gallon gallons; km: kilometer kilometers
kilometre kilometres; m: meter meters metre metres; cm: centimeter centimeters; mm-len:
millimeter millimeters; mi: mile miles; ft: foot feet; yd: yard yards; mph; kmh: kph;
s: sec secs second seconds; ms: millisecond milliseconds; min: mins minute minutes; h: hr hrs hour
hours; day: days; week: weeks; month: months; year: years yr yrs; decade: decades; century:
centuries; am: a.m; pm: p.m; kb; mb: megabyte megabytes; gb: gigabyte gigabytes; tb: terabyte
terabytes; hz; khz; mhz; ghz; w: watt watts; kw: kilowatt kilowatts; kwh; v: volt volts; mah;
pct: % percent per-cent; c: °c celsius; f: °f fahrenheit; deg: ° degree degrees; px; x: times
fold; st; nd; rd; th; usd: dollar dollars bucks; eur: euro euros; gbp: sterling; jpy: yen;
inr: rupee rupees; cad; aud; chf; btc: bitcoin bitcoins; calorie: calories kcal cal; cup:
cups; tbsp: tablespoon tablespoons; tsp: teaspoon teaspoons; person: people persons; k-temp:
kelvin;
"""
)
_ORDINAL_SUFFIXES = frozenset({"st", "nd", "rd", "th"})
CURRENCY_SIGNS = {"$": "usd", "€": "eur", "£": "gbp", "¥": "jpy", "₹": "inr", "₩": "krw"}
FRACTIONS = {"½": 0.5, "¼": 0.25, "¾": 0.75, "⅓": 1 / 3, "⅔": 2 / 3, "⅛": 0.125, "⅕": 0.2}
_ROMAN = re.compile(r"^(?:X{0,3})(?:IX|IV|V?I{0,3})$")
_ROMAN_VALUES = {"I": 1, "V": 5, "X": 10}

_TOKEN = re.compile(
    r"(?P<num>\d[\d,_]*(?:\.\d+)?(?::\d\d)*)(?P<suf>°?[^\W\d_]{1,4}\b|%|°[CFcf]?)?"
    r"|(?P<frac>[½¼¾⅓⅔⅛⅕])"
    r"|(?P<arrow>->|→|=>|⇒|⟶)"
    r"|(?P<op>\*\*|[\^\u00d7*/+\-\u2212$€£¥₹₩%°])"
    r"|(?P<word>[^\W\d_]+(?:['\u2019][^\W\d_]+)*)"
)
_OPS = {"^": "^", "**": "^", "\u00d7": "*", "*": "*", "/": "/", "+": "+", "-": "-", "\u2212": "-"}
_SENTENCE_END = frozenset(".!?:;\n\"'(¿¡")


def _canon_number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def _parse_digits(token: str) -> float:
    return float(token.replace(",", "").replace("_", ""))


def _roman(word: str) -> int | None:
    if not word or not _ROMAN.match(word):
        return None
    total, prev = 0, 0
    for ch in reversed(word):
        v = _ROMAN_VALUES[ch]
        total += -v if v < prev else v
        prev = max(prev, v)
    return total or None


def _digest(key: bytes, text: str) -> int:
    return _hasher(key)(text)


def _hasher(key: bytes) -> Callable[[str], int]:
    """The keyed 4-byte digest of a text, keyed once (a copy per text is 4x cheaper than
    keying each one)."""
    base = hashlib.blake2b(key=key[:64], digest_size=4, person=b"sem-guard")

    def digest(text: str) -> int:
        h = base.copy()
        h.update(text.encode())
        return int.from_bytes(h.digest())

    return digest


# ---------------------------------------------------------------- content words (swap, order)

CONTENT_MAX = 48
"""Content words kept per text for the swap and order guards (longer texts keep the first)."""
MARKERS_MAX = 8
TYPO_MIN = 5
"""Words this long or longer match a word one typo away (Damerau distance 1)."""
TYPO_LONGEST = 16

STOPWORDS = _wordset(
    """a an the this that these those some any each every all both such what whats which who
    whom whose how hows why when where whether is are was were be been being am do does did
    doing done have has had having can could should would will shall may might must i me my
    mine myself you your yours we us our ours they them their it its he him his she her one
    ones there here of for on at by with about as and or but if so then also just really very
    quite exactly actually basically please pls thanks thank hey hi hello ok okay quick
    question tell explain know want need like would id im ive ill youre get got way
    ways best good some thing things stuff anyone someone something anything kind sort
    possible possibly maybe perhaps still yet even again ever much many lot lots whats
    give show make let lets help idea tips tip steps step guide method process procedure
    happen happens happened difference differences different differ differs between
    recipe recipes recette recettes receta recetas ricetta ricette rezept rezepte receita
    receitas faire hacer fare machen fazer unterschied unterschiede unterscheiden
    unterscheidet zwischen difference entre diferencia diferencias differenza tra fra verschil
    tussen
    der die das den dem des ein eine einen einem einer eines ist sind war waren bin bist sein
    wird werden wurde hat haben kann können könnte soll sollte muss müssen man ich du er sie
    es wir ihr mein meine dein sich was wie warum wann wo welche welcher welches wer und oder
    aber auch noch schon nur bitte genau mal denn doch ja eigentlich im am zum zur vom beim
    le la les l un une des du de d est sont était être ai as a avons ont je tu il elle nous
    vous ils elles mon ma mes ton ta tes son sa ses ce cet cette ces qui quoi comment pourquoi
    quand où quel quelle quels quelles et ou mais aussi svp stp exactement s se y qu c j n au aux
    el los las unos unas lo es son era fue ser estar está están he ha han hay yo tú él ella
    nosotros mi mis tu tus su sus qué cómo por cuándo cuál cuáles dónde quién y o pero también
    favor exactamente se le les del al me te
    il lo gli i è sono era essere ho hai ha abbiamo hanno io lui lei noi mio mia miei tuo
    suo sua che cosa come perché quando dove quale quali chi ed o ma anche si ci del della dei
    delle dello degli al allo alla ai agli alle
    o os as um uma é são foi ser estar está eu ele ela nós meu minha seu sua que como porque
    quando onde qual quais quem e ou mas também do da dos das ao aos
    het een zijn ben was waren heb hebt heeft hebben ik jij hij zij wij mijn wat hoe waarom
    wanneer waar welke wie en of maar ook"""
)
"""Words that carry no content: articles, auxiliaries, pronouns, question words, fillers
(en, de, fr, es, it, pt, nl). Never a negation, a number or a direction marker."""

ORDER_MARKERS = _wordset("than to into from vs versus in en nach à que als naar dan para zu ->")
"""Words around which the same content words in another order say another thing."""
SYMMETRIC = _wordset(
    """and or between with differ differs difference differences compare compared comparison
    same both und oder zwischen et ou entre y o e tra fra tussen"""
)
"""Words that make a relation symmetric: "A and B", "between A and B", "A differs from B"."""

_CONTENT = re.compile(r"[^\W_]+(?:[-'\u2019][^\W_]+)*(?:\+\+|#)?|->|→|=>")
_ELISION = re.compile(r"^(?:l|d|qu|j|n|s|c|m|t|dell|all|dall|nell|sull|un)['\u2019]")
_STEM_SUFFIXES = (
    "izations", "ization", "izing", "ising", "ations", "ation", "ating", "ated", "ates", "ized",
    "ised", "izes", "ises", "ize", "ise", "ate", "ies", "ing", "ed", "es", "s",
)  # fmt: skip
_NOT_DOUBLED = frozenset("lsfz")


def _fold(word: str) -> str:
    """Lower case without diacritics (pâte -> pate, Ü -> u); other scripts kept as they are."""
    if word.isascii():
        return word.lower()
    decomposed = unicodedata.normalize("NFKD", word.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _stem(word: str) -> str:
    """A light multilingual stem: a plural or inflection suffix (-s, -es, -ies, -ed, -ing),
    then up to two final letters of -e, -n, -a, -o, -i (Tulpen/Tulpe, kittens/kitten,
    permitido/permitida)."""
    for suffix in _STEM_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in _NOT_DOUBLED:
                word = word[:-1]  # running -> run, shipped -> ship
            break
    for _ in range(2):
        if (len(word) > 4 and word[-1] in "enaoiy") or (len(word) > 3 and word[-1] == "e"):
            word = word[:-1]
    return word


def _content(text: str) -> tuple[list[str], list[tuple[str, int]], bool]:
    """The content words of `text` in order (stemmed, first occurrence each), each order
    marker with the number of content words before it (first occurrence each), and whether a
    word makes a relation symmetric (SYMMETRIC)."""
    words: list[str] = []
    seen: set[str] = set()
    marks: list[tuple[str, int]] = []
    after_number = False
    paired = False
    for raw, end in _pieces(text):
        number, after_number = after_number, False
        if not paired and raw.lower() in SYMMETRIC:
            paired = True
        if raw[0].isdigit() or (
            raw.lower() in UNITS and not (raw.lower() == "first" and _first_as_word(text, end))
        ):
            after_number = True  # the numbers guard reads "2pm", "2FA", "ten minutes"
            continue
        if number and raw.lower() in UNIT_NAMES:
            continue
        if raw in ("->", "→", "=>"):
            raw = "->"
        lower = raw.lower().replace("\u2019", "'")
        if lower in ORDER_MARKERS:
            _add_mark(lower, marks, len(words))
            continue
        if POLES.get(lower, ("", 0, 0))[2] == 1:  # north, before, above: the words around
            _add_mark(lower, marks, len(words))  # it have roles
        _add_content_of(raw, lower, words, seen)
    return words, marks, paired


def _add_mark(marker: str, marks: list[tuple[str, int]], at: int) -> None:
    """Adds an order marker with the number of content words before it (first one each)."""
    if len(marks) < MARKERS_MAX and all(m != marker for m, _ in marks):
        marks.append((marker, at))


def _add_content_of(raw: str, lower: str, words: list[str], seen: set[str]) -> None:
    """Adds the content word(s) of one piece of text: elisions and "'s" dropped, a compound
    of long words split ("cast-iron"), stop words, negations, units, scales and roman numerals
    left out, a scope word as its canonical form."""
    lower = _ELISION.sub("", lower)
    if lower.endswith("'s"):
        lower = lower[:-2]
    parts = [
        p
        for p in re.split(r"[-']", lower)
        if p and not p.isdigit() and (p not in UNITS or p == lower == "first")
    ]
    if len(parts) > 1 and all(len(p) >= 3 and p not in STOPWORDS for p in parts):
        for part in parts[:-1]:  # "cast-iron" is "cast iron"; "grown-up" stays one word
            _add_content(_fold(part), words, seen)
        parts = parts[-1:]
    word = _fold("".join(parts))
    if (
        not word
        or word in STOPWORDS
        or lower in STOPWORDS
        or word in NEGATIONS
        or (lower in UNITS and lower != "first")
        or lower in SCALES
        or (_roman(raw) is not None and len(raw) > 1)
    ):
        return
    canon = SCOPE.get(word)  # a grown-up is an adult
    if canon is not None:
        _add_content(canon, words, seen, stem=False)
    else:
        _add_content(word, words, seen, stem=not (raw.isupper() and len(raw) > 1))


def _pieces(text: str) -> list[tuple[str, int]]:
    """The words of `text` for `_content` with where each ends, a hyphenated word holding a
    number split at its hyphens ("ten-year-old" reads as "ten year old")."""
    out: list[tuple[str, int]] = []
    for match in _CONTENT.finditer(text):
        raw = match.group()
        if "-" in raw:
            parts = raw.split("-")
            if any(p[:1].isdigit() or p.lower() in UNITS for p in parts):
                at = match.start()
                for p in parts:
                    at += len(p)
                    if p:
                        out.append((p, at))
                    at += 1
                continue
        out.append((raw, match.end()))
    return out


_FIRST_NOUNS = _wordset("thing things step steps")
_NEXT_WORD = re.compile(r"\s*([^\W\d_]+)")
_PREVIOUS_WORD = re.compile(r"([^\W\d_]+)\s*$")


def _first_as_word(text: str, end: int) -> bool:
    """Is "first" (ending at `end`) "to begin with" rather than an ordinal: last in its
    sentence ("what do I do first?") or before a word that only means "what to do" ("the
    first thing", "the first step"), and not after "vs", "and"... ("second vs first")? It
    is then a content word, as "last" is."""
    if text[end : end + 1] == "-":
        return False
    before = _PREVIOUS_WORD.search(text, max(0, end - 5 - 24), end - 5)
    if before is not None and before.group(1).lower() in _NUMBER_JOINERS | {"than"}:
        return False
    match = _NEXT_WORD.match(text, end)
    return match is None or match.group(1).lower() in _FIRST_NOUNS


JOINS_MAX = 48


def _joins(text: str, content: list[str]) -> list[tuple[str, int, int]]:
    """Each two adjacent words (or hyphen parts) written as one, stemmed, with the index in
    `content` of each part (255: not a content word)."""
    where = {w: i for i, w in enumerate(content)}
    pieces = [_fold(part) for match in _CONTENT.finditer(text) for part in match.group().split("-")]
    out: list[tuple[str, int, int]] = []
    for left, right in itertools.pairwise(pieces):
        if len(out) >= JOINS_MAX:
            break
        if not (left.isalpha() and right.isalpha() and len(left) >= 2 and len(right) >= 2):
            continue
        out.append(
            (
                _stem(left + right),
                where.get(_stem(left), 255),
                where.get(_stem(right), 255),
            )
        )
    return out


def _add_content(word: str, words: list[str], seen: set[str], stem: bool = True) -> None:
    """Adds the stem of `word` (`stem=False`: an acronym, kept whole: HTTP/HTTPS)."""
    if stem:
        word = _stem(word)
    if word not in seen and len(words) < CONTENT_MAX:
        seen.add(word)
        words.append(word)


def _deletions(word: str) -> frozenset[str]:
    """The word less one letter, never the first (a typo seldom hits the first letter, and
    maternity / paternity are two words)."""
    return frozenset(word[:i] + word[i + 1 :] for i in range(1, len(word)))


# ---------------------------------------------------------------- extraction


@dataclass(slots=True)
class _Num:
    value: float
    unit: str = ""
    currency: str = ""
    negative: bool = False
    ordinal: bool = False
    time: str = ""

    def canon(self) -> str:
        sign = "-" if self.negative and self.value != 0 else ""
        core = self.time or _canon_number(self.value)
        return f"{self.currency}{sign}{core}{self.unit}"


def features(text: str, key: bytes = b"") -> Features:
    """The guards' view of `text`, as digests keyed with `key`."""
    reader = _Reader(text)
    reader.read()
    d = _hasher(key)
    content, marks, paired = _content(text)
    return Features(
        numbers=_numbers_digest(reader.nums, reader.joins, d),
        negations=reader.negations,
        words=frozenset(d(w) for w in reader.words),
        negated=frozenset(d(w) for w in reader.negated),
        poles=frozenset((d(g), p, k) for g, p, k in reader.poles),
        entities=tuple(d(e) for e in reader.entities),
        scope=frozenset(d(s) for s in reader.scope),
        directed=reader.directed,
        language=_language(reader.lang_votes, reader.scripts),
        roles=frozenset((d(w), r) for w, r in reader.roles),
        content=tuple(d(w) for w in content),
        typos=tuple(_typos(d, w) for w in content),
        marks=tuple((d(m), n) for m, n in marks),
        paired=paired,
        joins=tuple((d(j), i, k) for j, i, k in _joins(text, content)),
    )


_TEMPERATURES = {"c": "celsius", "f": "fahrenheit"}
_CURRENCY_UNITS = frozenset({"usd", "eur", "gbp", "jpy", "inr", "cad", "aud", "chf", "btc"})
_ARITHMETIC_WORDS = _wordset("minus negative plus times over power squared cubed")
_WORD_OPS = {"plus": "+", "times": "*", "over": "/"}


def _numbers_digest(nums: list[_Num | str], joins: list[int], d: Callable[[str], int]) -> int:
    """The digest of the numbers and operators in order (0: no number), a trailing operator
    left out as punctuation ("5 -")."""
    numbers = [n.canon() if isinstance(n, _Num) else n for n in nums]
    while numbers and not isinstance(nums[len(numbers) - 1], _Num):
        numbers.pop()
    return d(_number_text(nums[: len(numbers)], numbers, joins)) if numbers else 0


def _digits(digits: str) -> tuple[float, str]:
    """A number written in digits -> (value, time of day): "1,500" is 1500.0, "2:30" a time."""
    if ":" in digits:
        return 0.0, digits.lstrip("0") or "0"
    try:
        return _parse_digits(digits), ""
    except ValueError:
        return 0.0, ""


def _starts_sentence(text: str, at: int) -> bool:
    """Does the token at `at` start a sentence (nothing but spaces since a sentence end)?"""
    j = at - 1
    while j >= 0 and text[j].isspace():  # the gap since the last token: O(n) in all
        j -= 1
    return j < 0 or text[j] in _SENTENCE_END


class _Reader:
    """One left-to-right pass over the tokens of a text, collecting what `features` digests:
    numbers with their units and operators, negations, poles, entities, scope, roles."""

    __slots__ = (
        "directed",
        "entities",
        "join_at",
        "joins",
        "lang_votes",
        "last_kind",
        "negated",
        "negations",
        "nums",
        "pending_currency",
        "pending_sign",
        "poles",
        "prev_initial",
        "prev_word",
        "prev_word_raw",
        "role",
        "roles",
        "run",
        "scope",
        "scripts",
        "seen",
        "skip",
        "text",
        "tokens",
        "words",
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = list(_TOKEN.finditer(text))
        self.words: set[str] = set()
        self.negated: set[str] = set()
        self.poles: set[tuple[str, int, int]] = set()
        self.entities: list[str] = []
        self.seen: set[str] = set()  # the entities so far
        self.scope: set[str] = set()
        self.lang_votes: dict[str, int] = {}
        self.scripts: dict[str, int] = {}
        self.negations = 0
        self.directed = False
        self.roles: set[tuple[str, int]] = set()
        self.role = 0  # the last marker seen, waiting for its word
        self.nums: list[_Num | str] = []  # numbers and operators, in order
        self.run: list[float] = []  # number words not summed yet ("twenty five")
        self.pending_sign = False
        self.pending_currency = ""
        self.last_kind = ""  # "num", "op", "word", ""
        self.prev_word = ""
        self.prev_word_raw = ""
        self.prev_initial = True
        self.join_at = -1  # where a number joined to the one before by "and", "vs"... would stand
        self.joins: list[int] = []
        self.skip = -1  # a token already read with the one before it ("°" "F")

    def read(self) -> None:
        """Reads every token in order, then closes the last run of number words."""
        readers = _TOKEN_READERS
        for i, match in enumerate(self.tokens):
            if i != self.skip:
                readers["num" if match.group("num") is not None else match.lastgroup](
                    self, i, match
                )
        self.flush_run()
        self.close_join()

    def flush_run(self) -> None:
        """Sums the pending number words into one number ("two hundred thousand five")."""
        run = self.run
        if not run:
            return
        total = current = 0.0
        for value in run:
            if value in _SCALE_VALUES:
                current = (current or 1) * value
                if value >= 1000:
                    total, current = total + current, 0.0
            else:
                current += value
        self.nums.append(self.signed(total + current))
        run.clear()

    def signed(self, value: float, time: str = "") -> _Num:
        """A number taking the sign and currency that stood before it."""
        num = _Num(value, negative=self.pending_sign, currency=self.pending_currency, time=time)
        self.pending_sign, self.pending_currency = False, ""
        return num

    def add_entity(self, canon: str) -> None:
        """Notes an entity (a word too), first occurrence each, MARKS_MAX at most."""
        self.words.add(canon)
        if canon not in self.seen and len(self.entities) < MARKS_MAX:
            self.seen.add(canon)
            self.entities.append(canon)

    def close_join(self) -> None:
        """Keeps the pending join once a number came after its joiner ("4G and 5G")."""
        if self.join_at >= 0 and len(self.nums) > self.join_at:
            self.joins.append(self.join_at)
            self.join_at = -1

    def last_number(self) -> _Num | None:
        """The number just read, when the last token read was one."""
        nums = self.nums
        if self.last_kind == "num" and nums and isinstance(nums[-1], _Num):
            return nums[-1]
        return None

    def remember(self, lower: str, raw: str, initial: bool) -> None:
        """Notes the word just read as the one before the next."""
        self.prev_word, self.prev_word_raw, self.prev_initial = lower, raw, initial

    # ------------------------------------------------------------ tokens by kind

    def number(self, i: int, match: re.Match[str]) -> None:
        """A number in digits, with its suffix (5k, 3rd, 500mg, 40°F, 2pm)."""
        self.flush_run()
        value, time = _digits(match.group("num"))
        num = self.signed(value, time)
        suffix = match.group("suf")
        if suffix:
            self.suffix(num, suffix)
        self.nums.append(num)
        self.last_kind = "num"

    def suffix(self, num: _Num, suffix: str) -> None:
        """Applies a suffix to its number: a multiplier, an ordinal or a unit."""
        lower = suffix.lower()
        if suffix in MULTIPLIERS and not (suffix == "mm" and not num.currency):
            num.value *= MULTIPLIERS[suffix]
        elif suffix == "m" and num.currency:
            num.value *= 1e6
        elif lower in _ORDINAL_SUFFIXES:
            num.ordinal = True
        elif lower not in UNIT_NAMES and suffix[:1] != "°":
            pass  # "2FA", "3D": a number in a name, read as the number (two-factor)
        else:
            num.unit = UNIT_NAMES.get(lower, lower)
            if num.unit in _TEMPERATURES:
                self.add_entity(_TEMPERATURES[num.unit])

    def fraction(self, i: int, match: re.Match[str]) -> None:
        """A fraction sign (½)."""
        self.flush_run()
        self.nums.append(self.signed(FRACTIONS[match.group()]))
        self.last_kind = "num"

    def arrow(self, i: int, match: re.Match[str]) -> None:
        """An arrow (->, →): a direction marker."""
        self.flush_run()
        self.directed = True
        self.last_kind = "op"

    def operator(self, i: int, match: re.Match[str]) -> None:
        """A sign: a hyphen inside a number's words, a currency, a unit (%, °F), a minus
        sign or an arithmetic operator after a number."""
        raw = match.group()
        tokens = self.tokens
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is not None and nxt.start() != match.end():
            nxt = None  # only a token right after the sign reads with it
        if raw == "-" and nxt is not None and self.hyphen_in_number(nxt):
            return
        self.flush_run()
        if raw in CURRENCY_SIGNS:
            self.pending_currency = CURRENCY_SIGNS[raw]
            self.add_entity(ENTITIES.get(raw, CURRENCY_SIGNS[raw]))
        elif raw == "°" and nxt is not None and nxt.group().lower() in _TEMPERATURES:
            self.skip = i + 1
            self.add_entity(_TEMPERATURES[nxt.group().lower()])
            last = self.last_number()
            if last is not None:
                last.unit = nxt.group().lower()
        elif raw in ("%", "°"):
            last = self.last_number()
            if last is not None:
                last.unit = "pct" if raw == "%" else "deg"
        elif (
            raw in ("-", "\u2212")
            and self.last_kind != "num"
            and nxt is not None
            and nxt.group("num") is not None
            and not (i > 0 and tokens[i - 1].end() == match.start())  # COVID-19
        ):
            self.pending_sign = True
        elif self.last_kind == "num" and raw in _OPS:
            self.nums.append(_OPS[raw])
            self.last_kind = "op"

    def hyphen_in_number(self, nxt: re.Match[str]) -> bool:
        """Does a hyphen before `nxt` join the words of one number: "twenty-five",
        "ten-year-old" ("ten year old"), "10-minute" ("10 minute")?"""
        lower = nxt.group().lower()
        if self.run and lower in UNITS:
            return True
        return (
            bool(self.run or self.last_kind == "num")
            and nxt.lastgroup == "word"
            and lower in UNIT_NAMES
        )

    def word(self, i: int, match: re.Match[str]) -> None:
        """A word: a part of a number, else a plain word."""
        raw = match.group()
        lower = raw.lower().replace("\u2019", "'")
        if lower.endswith("'s"):
            lower, raw = lower[:-2], raw[:-2]  # "France's"
        initial = _starts_sentence(self.text, match.start())
        if not self.number_word(i, raw, lower, initial):
            self.plain_word(i, raw, lower, initial)

    # ------------------------------------------------------------ words in numbers

    def number_word(self, i: int, raw: str, lower: str, initial: bool) -> bool:
        """Reads a word that belongs to a number: its unit or multiplier, a number word, an
        arithmetic word or a roman numeral. False: it is a plain word."""
        run = self.run
        if run and (lower in UNIT_NAMES or lower in ("degree", "degrees")):
            self.flush_run()  # "ten minutes"
            self.last_kind = "num"
        if self.last_kind == "num" and not run and self.unit_word(raw, lower):
            return True
        if lower in UNITS and _counts(self.tokens, i, lower, self.prev_word):
            self.counting_word(lower)
            self.remember(lower, raw, initial)
            return True
        if lower in SCALES:
            run.append(float(SCALES[lower]))
            return True
        if lower == "and" and run and run[-1] in _SCALE_VALUES:
            return True  # "two hundred and five"
        if lower in _ARITHMETIC_WORDS and self.arithmetic_word(i, lower):
            return True
        return self.roman_numeral(raw, lower, initial)

    def unit_word(self, raw: str, lower: str) -> bool:
        """Applies a word after a number to it: a scale, a multiplier, a unit, a currency
        or an ordinal suffix. False: the word is not one of these."""
        last = self.last_number()
        if last is None or last.ordinal:
            return False
        if lower in SCALES:
            last.value *= SCALES[lower]
            return True
        if lower in ("bn", "mn", "k") or (raw in MULTIPLIERS and raw not in ("t", "b")):
            last.value *= MULTIPLIERS.get(raw, MULTIPLIERS.get(lower, 1.0))
            return True
        if lower in ("degree", "degrees") and not last.unit:
            last.unit = "deg"
            return True
        unit = UNIT_NAMES.get(lower)
        if unit is None or (last.unit and last.unit != "deg"):
            return False
        if unit in _CURRENCY_UNITS:
            last.currency = last.currency or unit
            self.add_entity(ENTITIES.get(lower, unit))
        elif unit in _ORDINAL_SUFFIXES:
            last.ordinal = True
        else:
            last.unit = unit
        if unit in _TEMPERATURES:
            self.add_entity(_TEMPERATURES[unit])
        return True

    def counting_word(self, lower: str) -> None:
        """A number word: an ordinal or "twice" stands alone, others join the run."""
        value = float(UNITS[lower])
        if lower in _ORDINAL_WORDS or lower in _TIMES_WORDS:
            self.flush_run()
            unit = "x" if lower in _TIMES_WORDS else ""  # "twice" is "two times"
            self.nums.append(_Num(value, unit=unit, ordinal=lower in _ORDINAL_WORDS))
            self.last_kind = "num"
            return
        if self.run and not _continues(self.run[-1], value):
            self.flush_run()
        self.run.append(value)
        self.last_kind = "word"

    def arithmetic_word(self, i: int, lower: str) -> bool:
        """Minus, plus, times, over, power, squared, cubed between numbers, as operators."""
        tokens = self.tokens
        if lower in ("minus", "negative"):
            if not (i + 1 < len(tokens) and tokens[i + 1].group("num") is not None):
                return False
            self.flush_run()
            if self.last_kind == "num":
                self.nums.append("-")
                self.last_kind = "op"
            else:
                self.pending_sign = True
            return True
        if lower in _WORD_OPS:
            if not ((self.last_kind == "num" or self.run) and _number_next(tokens, i)):
                return False
            self.flush_run()
            self.nums.append(_WORD_OPS[lower])
            self.last_kind = "op"
            return True
        if not self.nums:
            return False
        self.nums.append("^")
        if lower != "power":
            self.nums.append(_Num(2.0 if lower == "squared" else 3.0))
        return True

    def roman_numeral(self, raw: str, lower: str, initial: bool) -> bool:
        """A roman numeral: "World War II", "Henry VIII", "Part IV" (one letter only after
        a capitalised word inside a sentence)."""
        roman = _roman(raw)
        if roman is None or not (
            len(raw) >= 2 or (self.prev_word_raw[:1].isupper() and not self.prev_initial)
        ):
            return False
        self.flush_run()
        self.nums.append(_Num(float(roman)))
        self.last_kind = "num"
        self.remember(lower, raw, initial)
        return True

    # ------------------------------------------------------------ plain words

    def plain_word(self, i: int, raw: str, lower: str, initial: bool) -> None:
        """A word outside any number: negation, direction, polarity, entity, scope."""
        plain = lower.replace("'", "")
        after_number = self.last_kind == "num" or bool(self.run)
        self.flush_run()
        self.close_join()
        if (
            lower in _NUMBER_JOINERS
            and after_number
            and self.nums
            and isinstance(self.nums[-1], _Num)
        ):
            self.join_at = len(self.nums)
        elif lower not in _JOIN_FILLERS:
            self.join_at = -1
        self.last_kind = "word"
        _scripts(raw, self.scripts)
        self.negations += self.negation_count(i, raw, lower, plain)
        self.direction(lower, plain)
        if len(self.words) < WORDS_MAX:
            self.words.add(plain)
            if plain.endswith("ful") and len(plain) > 6:
                self.words.add(plain[:-3])  # "careful" stands for "care" against "careless"
        for lang in _LANG_OF.get(lower, ()):
            self.lang_votes[lang] = self.lang_votes.get(lang, 0) + 1
        self.polarity(plain)
        self.entity(raw, lower, plain, initial)
        self.scoped(i, lower, plain)
        self.remember(lower, raw, initial)

    def negation_count(self, i: int, raw: str, lower: str, plain: str) -> int:
        """How many negations the word holds (not, n't, -free, 不, ない, 안...)."""
        if plain in NEGATIONS or lower.endswith("n't"):
            return 1
        if (plain == "free" and i > 0 and self.tokens[i - 1].group() == "-") or (
            len(plain) >= 7 and plain.endswith(("free", "frei"))
        ):
            return 1  # "chemical-free" is "without chemicals", glutenfrei
        for signs in (NEGATION_CHARS, NEGATION_KANA, NEGATION_HANGUL):
            if any(s in raw for s in signs):
                return sum(raw.count(s) for s in signs)
        return 0

    def direction(self, lower: str, plain: str) -> None:
        """Gives the word after "from" / "to" its role; notes a direction marker."""
        if self.role and plain not in _DETERMINERS:
            if len(self.roles) < MARKS_MAX:
                self.roles.add((plain, self.role))
            self.role = 0
        if lower in DIRECTION_MARKERS:
            self.directed = True
            self.role = 1 if lower == "from" else 2 if lower in _TO_MARKERS else 0

    def polarity(self, plain: str) -> None:
        """A pole from the lexicon, else a stem negated by an affix (unsuitable, non-...)."""
        pole = POLES.get(plain)
        if pole is not None:
            self.poles.add(pole)
        else:
            stem = _negated_stem(plain)
            if stem is not None and len(self.negated) < MARKS_MAX:
                self.negated.add(stem)
        if self.prev_word == "non" and len(self.negated) < MARKS_MAX:  # "non-transferable"
            self.negated.add(plain)

    def entity(self, raw: str, lower: str, plain: str, initial: bool) -> None:
        """A named entity: a known bigram or name, a month written as one, a proper noun."""
        bigram = _ENTITY_BIGRAMS.get((self.prev_word, lower))
        canon = ENTITIES.get(plain)
        if bigram is not None:
            self.add_entity(bigram)
        elif canon is not None and not (canon == "march-month" or canon == "may-month"):
            if plain not in ("us",) or raw == "US":
                self.add_entity(canon)
        elif (plain in ("march", "may") and raw[:1].isupper() and not initial) or (
            _looks_named(raw, initial) and plain not in SCOPE
        ):
            self.add_entity(plain[:-1] if plain.endswith("s") and len(plain) > 4 else plain)

    def scoped(self, i: int, lower: str, plain: str) -> None:
        """Who or what it is for: grown-up, a scope word, a travel class."""
        sc = SCOPE.get(plain)
        if lower == "up" and self.prev_word == "grown":
            self.scope.add("adult")
        elif sc is not None and plain not in _SCOPE_SKIP_IF_ENTITY and _scoped(self.tokens, i, sc):
            self.scope.add(sc)
        elif lower == "class" and self.prev_word in ("first", "business", "economy", "premium"):
            self.scope.add(self.prev_word + "-class")


_TOKEN_READERS: dict[str | None, Callable[[_Reader, int, re.Match[str]], None]] = {
    "num": _Reader.number,
    "frac": _Reader.fraction,
    "arrow": _Reader.arrow,
    "op": _Reader.operator,
    "word": _Reader.word,
}
"""How each kind of token (a group of _TOKEN) is read."""


_NUMBER_JOINERS = _wordset("and or vs versus differ differs compared compare und oder et ou y o e")
"""Words that make the numbers on their two sides a set: "4G and 5G" is "5G and 4G"."""
_JOIN_FILLERS = _wordset("from to with the a an")
"""Words that may stand between a joiner and the next number ("differ from", "and the")."""


def _number_text(nums: list[_Num | str], canon: list[str], joins: list[int]) -> str:
    """The numbers in order, as text; a run of groups (a number with its operators: 2^10,
    03/05/2021) joined by "and", "vs", "differ from"... directly is sorted, so "4G and 5G"
    reads as "5G differ from 4G" while 2^10 and 10^2 stay apart."""
    clusters: list[list[list[str]]] = []
    joined = set(joins)
    for i, item in enumerate(nums):
        starts = isinstance(item, _Num) and (i == 0 or isinstance(nums[i - 1], _Num) or i in joined)
        if starts and i in joined and clusters:
            clusters[-1].append([canon[i]])
        elif starts or not clusters:
            clusters.append([[canon[i]]])
        else:
            clusters[-1][-1].append(canon[i])
    parts = []
    for cluster in clusters:
        groups = ["\x00".join(g) for g in cluster]
        parts.append("\x00&\x00".join(sorted(groups)) if len(groups) > 1 else groups[0])
    return "\x00".join(parts)


def _typos(d: Callable[[str], int], word: str) -> tuple[int, ...]:
    if not TYPO_MIN <= len(word) <= TYPO_LONGEST:
        return ()
    return tuple(sorted({d(w) & 0xFFFF for w in (word, *_deletions(word))}))


_TIMES_WORDS = _wordset("once twice thrice")
_ORDINAL_WORDS = _wordset("first second third fourth fifth sixth seventh eighth ninth tenth")


def _counts(tokens: list[re.Match[str]], i: int, lower: str, prev_word: str) -> bool:
    """Is this number word a number? Not "one" as a pronoun or article ("which one", "on one
    charge", "one-way"). A hyphen reads as a space: "two-factor" is "two factor", "half-life"
    is "half life"."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    after = tokens[i + 2] if i + 2 < len(tokens) else None
    if (
        nxt is not None
        and nxt.group() == "-"
        and nxt.start() == tokens[i].end()
        and after is not None
        and after.start() == nxt.end()
        and after.lastgroup == "word"
    ):
        nxt = after
    if lower == "first":
        return not _first_as_word(tokens[i].string, tokens[i].end())
    if lower != "one":
        return True
    if prev_word in _PRONOUN_ONE:
        return False
    if nxt is None or nxt.lastgroup != "word":
        return False
    word = nxt.group().lower()
    return word in SCALES or word in UNIT_NAMES or word in UNITS


def _number_next(tokens: list[re.Match[str]], i: int) -> bool:
    """Is the next token a number ("2 times 3"), not "two times" (twice)?"""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if nxt is None:
        return False
    return nxt.group("num") is not None or nxt.group().lower() in UNITS


_PLAN_SCOPES = _wordset(
    "free basic pro plus premium team business enterprise trial family standard personal "
    "individual economy"
)
_PLAN_NOUNS = _wordset(
    """plan plans tier tiers account accounts subscription subscriptions license licence
    licenses edition version versions membership memberships class seat seats user users
    customer customers member members ticket tickets fare fares pass passes package packages
    level cabin option options"""
)
_MINOR_FOLLOWERS = _wordset("in under at and or who with to")


def _scoped(tokens: list[re.Match[str]], i: int, canon: str) -> bool:
    """Does this scope word say who or which plan? A plan word only before a plan noun ("the
    free plan", not "chemical-free"), "minor" not before a noun ("a minor burn")."""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    word = nxt.group().lower() if nxt is not None and nxt.lastgroup == "word" else ""
    if canon in _PLAN_SCOPES:
        return word in _PLAN_NOUNS
    if canon == "minor":
        return not word or word in _MINOR_FOLLOWERS
    return True


def _continues(previous: float, value: float) -> bool:
    """Does a number word go on the number before it ("twenty" "five", "hundred" "five")?"""
    if previous in _SCALE_VALUES:
        return True
    return previous % 10 == 0 and 20 <= previous <= 90 and value < 10


_PRONOUN_ONE = _wordset(
    "which the this that each every any no some someone anyone everyone no-one another"
)
_STEM_MIN = 4
_NOT_AFFIXED = _wordset(
    """under understand understanding until unless universe university unique union unit
    united uniform unity index indeed inside insight install installed installing instance
    instead instant interest interesting internal internet into invest investing investment
    invoice involve image impact import important imply improve impress issue discuss
    discussion display distance distinct distribute district dish disk discount discover
    discord dispatch illustrate illness irony iron income increase include included inform
    information insurance input inquiry instagram integral integrate intelligence interval
    """
)


def _negated_stem(word: str) -> str | None:
    """The stem an affix negates ("unsuitable" -> "suitable", "careless" -> "care")."""
    if word in _NOT_AFFIXED or len(word) < _STEM_MIN + 2:
        return None
    for prefix in NEGATIVE_PREFIXES:
        if word.startswith(prefix) and len(word) - len(prefix) >= _STEM_MIN:
            return word[len(prefix) :].lstrip("-")
    for suffix in NEGATIVE_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return None


def _looks_named(raw: str, initial: bool) -> bool:
    """A capitalised word mid-sentence, or one with inner capitals or all capitals (NASA,
    MySQL, iPhone): a name."""
    if len(raw) < 2 or not raw.isalpha():
        return False
    inner = any(ch.isupper() for ch in raw[1:])
    if inner:
        return True
    return raw[0].isupper() and not initial and raw.lower() not in _NOT_NAMES


_NOT_NAMES = _wordset(
    """i i'm i've i'd i'll ok okay please thanks hello hi hey yes no what how why when which who
    where is are can could should would will do does did the a an"""
)


def _scripts(word: str, counts: dict[str, int]) -> None:
    ch = word[0]
    o = ord(ch)
    if o < 0x250:
        name = "latin"
    elif 0x370 <= o < 0x400:
        name = "greek"
    elif 0x400 <= o < 0x530:
        name = "cyrillic"
    elif 0x590 <= o < 0x600:
        name = "hebrew"
    elif 0x600 <= o < 0x700:
        name = "arabic"
    elif 0x900 <= o < 0x980:
        name = "devanagari"
    elif 0xE00 <= o < 0xE80:
        name = "thai"
    elif 0x3040 <= o < 0x3100:
        name = "kana"
    elif 0xAC00 <= o < 0xD7B0:
        name = "hangul"
    elif 0x4E00 <= o < 0xA000:
        name = "han"
    else:
        name = "other"
    counts[name] = counts.get(name, 0) + len(word)


def _language(votes: dict[str, int], scripts: dict[str, int]) -> str:
    if not scripts:
        return ""
    script = max(scripts, key=lambda k: scripts[k])
    if script == "han" and "kana" in scripts:
        return "kana"
    if script != "latin":
        return script
    ranked = sorted(votes.values(), reverse=True)
    if not ranked or ranked[0] < 2 or (len(ranked) > 1 and ranked[0] < 2 * ranked[1]):
        return ""
    return max(votes, key=lambda k: votes[k])


# ---------------------------------------------------------------- the guards


def numbers(a: Features, b: Features) -> bool:
    """The numbers differ, or come in another order."""
    return a.numbers != b.numbers


def negation(a: Features, b: Features) -> bool:
    """One text holds more negations than the other."""
    return a.negations != b.negations


def affix(a: Features, b: Features) -> bool:
    """A stem negated by an affix in one text stands plain (and only plain) in the other."""
    return _affix_one_way(a, b) or _affix_one_way(b, a)


def _affix_one_way(a: Features, b: Features) -> bool:
    return any(s in b.words and s not in b.negated and s not in a.words for s in a.negated)


def _pole_clash(a: Features, b: Features, kind: int) -> bool:
    groups_a: dict[int, set[int]] = {}
    for g, p, k in a.poles:
        if k == kind:
            groups_a.setdefault(g, set()).add(p)
    groups_b: dict[int, set[int]] = {}
    for g, p, k in b.poles:
        if k == kind:
            groups_b.setdefault(g, set()).add(p)
    return any(
        g in groups_b and (poles - groups_b[g]) and (groups_b[g] - poles)
        for g, poles in groups_a.items()
    )


def antonym(a: Features, b: Features) -> bool:
    """A lexicon pair (allow/ban, included/excluded, ...) stands on opposite sides."""
    return _pole_clash(a, b, 0)


def direction(a: Features, b: Features) -> bool:
    """Direction words (buy/sell, import/export, before/after, ...) stand on opposite sides."""
    return _pole_clash(a, b, 1)


def entity(a: Features, b: Features) -> bool:
    """Each text names an entity, product, currency or language the other lacks (Canada /
    China): a swap. One that only adds a name ("a pivot table" / "... in Excel", "on
    Earth", "Darwin's theory") narrows or restates the question, which the scope and swap
    guards judge."""
    return any(e not in b.words for e in a.entities) and any(e not in a.words for e in b.entities)


def order(a: Features, b: Features) -> bool:
    """A word that one text moves from is one the other moves to; or around an order marker
    both texts hold (than, to, into, en, nach, que, als, ->) one content word goes from
    before it to after it while another goes the other way (miles en kilomètres /
    kilomètres en miles, Everest taller than K2 / K2 taller than Everest); or the shared
    entities come in another order where a direction marker makes order matter."""
    if any((w, 3 - r) in b.roles for w, r in a.roles):
        return True  # "from PayPal to my bank" / "from my bank to PayPal"
    return _crossed(a, b) or _transposed(a, b)


def _transposed(a: Features, b: Features) -> bool:
    """The shared content words in the same order but for two, at least two apart, that
    trade places ("Can a Mac run Windows apps?" / "Can a Windows PC run Mac apps?"), where
    no word makes the relation symmetric ("A and B", "between", "differ")."""
    if a.paired or b.paired:
        return False
    in_a, in_b = set(a.content), set(b.content)
    seq_a = [w for w in a.content if w in in_b]
    seq_b = [w for w in b.content if w in in_a]
    if len(seq_a) != len(seq_b):
        return False  # two words with one digest
    moved = [i for i, (x, y) in enumerate(zip(seq_a, seq_b, strict=True)) if x != y]
    if len(moved) != 2:
        return False
    i, j = moved
    return j - i >= 2 and seq_a[i] == seq_b[j] and seq_a[j] == seq_b[i]


SWAP_MAX = 2
"""At most this many unmatched content words on each side make a replacement (a minimal
pair), not a rewording."""
SWAP_SHARED_MIN = 1
"""... with at least this many content words shared."""


def _unmatched(a: Features, b: Features) -> tuple[list[int], list[int], int]:
    """A's and B's content words the other lacks (one typo apart counts as the same word),
    and how many they share."""
    in_b = set(b.content)
    in_a = set(a.content)
    only_a = [i for i, w in enumerate(a.content) if w not in in_b]
    only_b = [i for i, w in enumerate(b.content) if w not in in_a]
    shared = len(in_a & in_b)
    if (only_a or only_b) and (a.joins or b.joins):
        whole_a, parts_b = _compounds(a, b, only_a)
        whole_b, parts_a = _compounds(b, a, only_b)
        shared += len(whole_a) + len(whole_b)
        only_a = [i for i in only_a if i not in whole_a and i not in parts_a]
        only_b = [i for i in only_b if i not in whole_b and i not in parts_b]
    if only_a and only_b:
        ta = [frozenset(a.typos[i]) if i < len(a.typos) else frozenset() for i in only_a]
        tb = [frozenset(b.typos[i]) if i < len(b.typos) else frozenset() for i in only_b]
        near_a = [any(x & y for y in tb) for x in ta]
        near_b = [any(y & x for x in ta) for y in tb]
        shared += min(sum(near_a), sum(near_b))
        only_a = [i for i, near in zip(only_a, near_a, strict=True) if not near]
        only_b = [i for i, near in zip(only_b, near_b, strict=True) if not near]
    return only_a, only_b, shared


def _compounds(a: Features, b: Features, only_a: list[int]) -> tuple[set[int], set[int]]:
    """A's unmatched words that B writes as two words ("goldfish" / "gold fish", "forloop" /
    "for loop"), and the indices of those two words in B's content."""
    joins_b = {j: (i, k) for j, i, k in b.joins}
    whole: set[int] = set()
    parts: set[int] = set()
    for i in only_a:
        pair = joins_b.get(a.content[i])
        if pair is not None:
            whole.add(i)
            parts.update(x for x in pair if x != 255)
    return whole, parts


def swap(a: Features, b: Features) -> bool:
    """Nearly the same content words with one or two replaced on each side (a minimal pair:
    thicker/thinner, soccer/basketball, required/optional, samedi/dimanche); a typo or
    another inflection of the same word is not a replacement."""
    only_a, only_b, shared = _unmatched(a, b)
    if not only_a or not only_b:
        return False
    most = max(len(only_a), len(only_b))
    return most <= SWAP_MAX and shared >= SWAP_SHARED_MIN * most


def _crossed(a: Features, b: Features) -> bool:
    at_b = dict(b.marks)
    for marker, n_a in a.marks:
        n_b = at_b.get(marker)
        if n_b is None:
            continue
        before_a, after_a = set(a.content[:n_a]), set(a.content[n_a:])
        before_b, after_b = set(b.content[:n_b]), set(b.content[n_b:])
        if before_a & after_b and after_a & before_b:
            return True
    return False


def scope(a: Features, b: Features) -> bool:
    """Who or which plan or class it is for differs."""
    return a.scope != b.scope


def language(a: Features, b: Features) -> bool:
    """The two texts are written in different languages."""
    return bool(a.language and b.language and a.language != b.language)


GUARDS: tuple[tuple[str, Callable[[Features, Features], bool]], ...] = (
    ("numbers", numbers),
    ("negation", negation),
    ("affix", affix),
    ("antonym", antonym),
    ("direction", direction),
    ("entity", entity),
    ("order", order),
    ("scope", scope),
    ("language", language),
    ("swap", swap),
)
"""Every guard, by the name its refusal is logged under, in the order they are asked."""


def refusal(a: Features, b: Features) -> str | None:
    """The name of the first guard that refuses A against B, or None."""
    for name, refuses in GUARDS:
        if refuses(a, b):
            return name
    return None


# ---------------------------------------------------------------- stored form

_HEAD = struct.Struct("<BBIHHHHHH??")


def pack(f: Features) -> bytes:
    """Features as bytes for an index record (digests only)."""
    poles = sorted(f.poles)
    head = _HEAD.pack(
        VERSION,
        min(f.negations, 255),
        f.numbers,
        len(f.words),
        len(f.negated),
        len(poles),
        len(f.entities),
        len(f.scope),
        len(f.roles),
        f.directed,
        f.paired,
    )
    lang = f.language.encode()[:16]
    parts = [head, bytes([len(lang)]), lang]
    parts.append(struct.pack(f"<{len(f.words)}I", *sorted(f.words)))
    parts.append(struct.pack(f"<{len(f.negated)}I", *sorted(f.negated)))
    parts.append(b"".join(struct.pack("<Ibb", g, p, k) for g, p, k in poles))
    parts.append(struct.pack(f"<{len(f.entities)}I", *f.entities))
    parts.append(struct.pack(f"<{len(f.scope)}I", *sorted(f.scope)))
    parts.append(b"".join(struct.pack("<Ib", w, r) for w, r in sorted(f.roles)))
    parts.append(struct.pack(f"<H{len(f.content)}I", len(f.content), *f.content))
    for typos in f.typos:
        parts.append(struct.pack(f"<B{len(typos)}H", len(typos), *typos))
    parts.append(bytes([len(f.marks)]))
    parts.append(b"".join(struct.pack("<IH", m, n) for m, n in f.marks))
    parts.append(bytes([len(f.joins)]))
    parts.append(b"".join(struct.pack("<IBB", j, i, k) for j, i, k in f.joins))
    return b"".join(parts)


_SHORT = struct.Struct("<H")


class _Cursor:
    """Reads a packed guard record front to back."""

    __slots__ = ("at", "data")

    def __init__(self, data: bytes, at: int) -> None:
        self.data = data
        self.at = at

    def byte(self) -> int:
        """One unsigned byte."""
        self.at += 1
        return self.data[self.at - 1]

    def ints(self, n: int) -> tuple[int, ...]:
        """`n` unsigned 32-bit ints."""
        out = struct.unpack_from(f"<{n}I", self.data, self.at)
        self.at += 4 * n
        return out

    def records(self, fmt: struct.Struct, n: int) -> list[tuple[Any, ...]]:
        """`n` records of one fixed layout."""
        out = []
        for _ in range(n):
            out.append(fmt.unpack_from(self.data, self.at))
            self.at += fmt.size
        return out

    def short(self) -> int:
        """One unsigned 16-bit int."""
        (value,) = _SHORT.unpack_from(self.data, self.at)
        self.at += 2
        return int(value)

    def typos(self, n: int) -> list[tuple[int, ...]]:
        """`n` typo lists, each its length byte then 16-bit digests."""
        out = []
        for _ in range(n):
            nt = self.byte()
            out.append(struct.unpack_from(f"<{nt}H", self.data, self.at))
            self.at += 2 * nt
        return out


_POLE = struct.Struct("<Ibb")
_ROLE = struct.Struct("<Ib")
_MARK = struct.Struct("<IH")
_JOIN = struct.Struct("<IBB")


def unpack(data: bytes) -> Features:
    """pack() reversed; ValueError (or struct.error) when damaged."""
    version, neg, nums, nw, nn, np_, ne, ns, nr, directed, paired = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ValueError("unknown guard record version")
    read = _Cursor(data, _HEAD.size)
    llen = read.byte()
    lang = data[read.at : read.at + llen].decode()
    read.at += llen
    words = read.ints(nw)
    negated = read.ints(nn)
    poles = read.records(_POLE, np_)
    entities = read.ints(ne)
    scope = read.ints(ns)
    roles = read.records(_ROLE, nr)
    nc = read.short()
    content = read.ints(nc)
    typos = read.typos(nc)
    marks = read.records(_MARK, read.byte())
    joins = read.records(_JOIN, read.byte())
    if read.at != len(data):
        raise ValueError("damaged guard record")
    return Features(
        numbers=nums,
        negations=neg,
        words=frozenset(words),
        negated=frozenset(negated),
        poles=frozenset(poles),
        entities=entities,
        scope=frozenset(scope),
        directed=directed,
        language=lang,
        roles=frozenset(roles),
        content=content,
        typos=tuple(typos),
        marks=tuple(marks),
        paired=paired,
        joins=tuple(joins),
    )
