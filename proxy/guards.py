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
import re
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


WORDS_MAX = 256
"""Distinct words kept per text for the affix and entity guards (longer texts keep the first)."""
MARKS_MAX = 64
"""Entities, negated stems and from/to words kept per text (the stored form stays small)."""
VERSION = 2


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
    marked: set[str] = set()
    after_number = False
    paired = False
    for match in _CONTENT.finditer(text):
        raw = match.group()
        number, after_number = after_number, False
        if not paired and raw.lower() in SYMMETRIC:
            paired = True
        if raw[0].isdigit() or raw.lower() in UNITS:
            after_number = True  # the numbers guard reads "2pm", "2FA", "ten minutes"
            continue
        if number and raw.lower() in UNIT_NAMES:
            continue
        if raw in ("->", "→", "=>"):
            raw = "->"
        lower = raw.lower().replace("\u2019", "'")
        if lower in ORDER_MARKERS:
            if lower not in marked and len(marks) < MARKERS_MAX:
                marked.add(lower)
                marks.append((lower, len(words)))
            continue
        # north, before, above: the words around it have roles
        if (
            POLES.get(lower, ("", 0, 0))[2] == 1
            and lower not in marked
            and len(marks) < MARKERS_MAX
        ):
            marked.add(lower)
            marks.append((lower, len(words)))
        lower = _ELISION.sub("", lower)
        if lower.endswith("'s"):
            lower = lower[:-2]
        parts = [p for p in re.split(r"[-']", lower) if p and not p.isdigit() and p not in UNITS]
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
            or lower in UNITS
            or lower in SCALES
            or (_roman(raw) is not None and len(raw) > 1)
        ):
            continue
        canon = SCOPE.get(word)  # a grown-up is an adult
        if canon is not None:
            _add_content(canon, words, seen, stem=False)
            continue
        _add_content(word, words, seen, stem=not (raw.isupper() and len(raw) > 1))
    return words, marks, paired


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
    words: set[str] = set()
    negated: set[str] = set()
    poles: set[tuple[str, int, int]] = set()
    entities: list[str] = []
    scope: set[str] = set()
    lang_votes: dict[str, int] = {}
    scripts: dict[str, int] = {}
    numbers: list[str] = []
    negations = 0
    directed = False
    roles: set[tuple[str, int]] = set()
    role = 0  # the last marker seen, waiting for its word

    nums: list[_Num | str] = []  # numbers and operators, in order
    run: list[float] = []
    pending_sign = False
    pending_currency = ""
    last_kind = ""  # "num", "op", "word", ""
    prev_word = ""
    prev_word_raw = ""
    prev_initial = True

    def flush_run() -> None:
        nonlocal pending_sign, pending_currency
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
        nums.append(_Num(total + current, negative=pending_sign, currency=pending_currency))
        pending_sign, pending_currency = False, ""
        run.clear()

    seen: set[str] = set()

    def add_entity(canon: str) -> None:
        words.add(canon)
        if canon not in seen and len(entities) < MARKS_MAX:
            seen.add(canon)
            entities.append(canon)

    tokens = list(_TOKEN.finditer(text))
    skip = -1  # a token already read with the one before it ("°" "F")
    for i, match in enumerate(tokens):
        kind = "num" if match.group("num") is not None else match.lastgroup
        raw = match.group()
        if i == skip:
            continue
        j = match.start() - 1
        while j >= 0 and text[j].isspace():  # the gap since the last token: O(n) in all
            j -= 1
        initial = j < 0 or text[j] in _SENTENCE_END
        if kind == "num":
            flush_run()
            digits = match.group("num")
            suffix = match.group("suf") or ""
            time = ""
            if ":" in digits:
                time = digits.lstrip("0") or "0"
                value = 0.0
            else:
                try:
                    value = _parse_digits(digits)
                except ValueError:
                    value = 0.0
            num = _Num(value, negative=pending_sign, currency=pending_currency, time=time)
            pending_sign, pending_currency = False, ""
            if suffix:
                if suffix in MULTIPLIERS and not (suffix == "mm" and not num.currency):
                    num.value *= MULTIPLIERS[suffix]
                elif suffix == "m" and num.currency:
                    num.value *= 1e6
                elif suffix.lower() in _ORDINAL_SUFFIXES:
                    num.ordinal = True
                elif suffix.lower() not in UNIT_NAMES and suffix[:1] != "°":
                    continue  # "2FA", "3D": a name, not a number
                else:
                    num.unit = UNIT_NAMES.get(suffix.lower(), suffix.lower())
                    if num.unit in ("c", "f"):
                        add_entity("celsius" if num.unit == "c" else "fahrenheit")
            nums.append(num)
            last_kind = "num"
            continue
        if kind == "frac":
            flush_run()
            nums.append(_Num(FRACTIONS[raw], negative=pending_sign, currency=pending_currency))
            pending_sign, pending_currency = False, ""
            last_kind = "num"
            continue
        if kind == "arrow":
            flush_run()
            directed = True
            last_kind = "op"
            continue
        if kind == "op":
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            adjacent = nxt is not None and nxt.start() == match.end()
            if raw == "-" and run and adjacent and nxt is not None and nxt.group().lower() in UNITS:
                continue  # "twenty-five"
            flush_run()
            if raw in CURRENCY_SIGNS:
                pending_currency = CURRENCY_SIGNS[raw]
                add_entity(ENTITIES.get(raw, CURRENCY_SIGNS[raw]))
                continue
            if raw == "°" and adjacent and nxt is not None and nxt.group().lower() in ("c", "f"):
                skip = i + 1
                add_entity("celsius" if nxt.group().lower() == "c" else "fahrenheit")
                if nums and isinstance(nums[-1], _Num) and last_kind == "num":
                    nums[-1].unit = nxt.group().lower()
                continue
            if raw in ("%", "°"):
                if nums and isinstance(nums[-1], _Num) and last_kind == "num":
                    nums[-1].unit = "pct" if raw == "%" else "deg"
                continue
            if (
                raw in ("-", "\u2212")
                and last_kind != "num"
                and adjacent
                and nxt is not None
                and nxt.group("num") is not None
                and not (i > 0 and tokens[i - 1].end() == match.start())  # COVID-19
            ):
                pending_sign = True
                continue
            if last_kind == "num" and raw in _OPS:
                nums.append(_OPS[raw])
                last_kind = "op"
            continue
        # a word
        lower = raw.lower().replace("\u2019", "'")
        if lower.endswith("'s"):
            lower, raw = lower[:-2], raw[:-2]  # "France's"
        plain = lower.replace("'", "")
        # units and multipliers after a number
        if run and (lower in UNIT_NAMES or lower in ("degree", "degrees")):
            flush_run()  # "ten minutes"
            last_kind = "num"
        if (
            last_kind == "num"
            and nums
            and isinstance(nums[-1], _Num)
            and not run
            and not nums[-1].ordinal
        ):
            last = nums[-1]
            if lower in SCALES:
                last.value *= SCALES[lower]
                continue
            if lower in ("bn", "mn", "k") or (raw in MULTIPLIERS and raw not in ("t", "b")):
                last.value *= MULTIPLIERS.get(raw, MULTIPLIERS.get(lower, 1.0))
                continue
            if lower in ("degree", "degrees") and not last.unit:
                last.unit = "deg"
                continue
            unit = UNIT_NAMES.get(lower)
            if unit is not None and (not last.unit or last.unit == "deg"):
                if unit in ("usd", "eur", "gbp", "jpy", "inr", "cad", "aud", "chf", "btc"):
                    last.currency = last.currency or unit
                    add_entity(ENTITIES.get(lower, unit))
                elif unit in _ORDINAL_SUFFIXES:
                    last.ordinal = True
                else:
                    last.unit = unit
                if unit in ("c", "f"):
                    add_entity("celsius" if unit == "c" else "fahrenheit")
                continue
        # number words
        if lower in UNITS and _counts(tokens, i, lower, prev_word):
            value = float(UNITS[lower])
            if lower in _ORDINAL_WORDS or lower in _TIMES_WORDS:
                flush_run()
                # "twice" is "two times"
                unit = "x" if lower in _TIMES_WORDS else ""
                nums.append(_Num(value, unit=unit, ordinal=lower in _ORDINAL_WORDS))
                last_kind = "num"
                prev_word, prev_word_raw, prev_initial = lower, raw, initial
                continue
            if run and not _continues(run[-1], value):
                flush_run()
            run.append(value)
            last_kind = "word"
            prev_word, prev_word_raw, prev_initial = lower, raw, initial
            continue
        if lower in SCALES:
            run.append(float(SCALES[lower]))
            continue
        if lower == "and" and run and run[-1] in _SCALE_VALUES:
            continue
        if lower in ("minus", "negative") and (
            i + 1 < len(tokens) and tokens[i + 1].group("num") is not None
        ):
            flush_run()
            if last_kind == "num":
                nums.append("-")
                last_kind = "op"
            else:
                pending_sign = True
            continue
        if (
            lower in ("plus", "times", "over")
            and (last_kind == "num" or run)
            and _number_next(tokens, i)
        ):
            flush_run()
            nums.append({"plus": "+", "times": "*", "over": "/"}[lower])
            last_kind = "op"
            continue
        if lower in ("power", "squared", "cubed") and nums:
            nums.append("^")
            if lower != "power":
                nums.append(_Num(2.0 if lower == "squared" else 3.0))
            continue
        # roman numerals: "World War II", "Henry VIII", "Part IV"
        roman = _roman(raw)
        if roman is not None and (
            len(raw) >= 2
            or (prev_word_raw[:1].isupper() and not prev_initial and raw != "I")
            or (raw == "I" and prev_word_raw[:1].isupper() and not prev_initial)
        ):
            flush_run()
            nums.append(_Num(float(roman)))
            last_kind = "num"
            prev_word, prev_word_raw, prev_initial = lower, raw, initial
            continue
        flush_run()
        last_kind = "word"
        _scripts(raw, scripts)
        # negation
        if plain in NEGATIONS or lower.endswith("n't"):
            negations += 1
        elif (plain == "free" and i > 0 and tokens[i - 1].group() == "-") or (
            len(plain) >= 7 and plain.endswith(("free", "frei"))
        ):
            negations += 1  # "chemical-free" is "without chemicals", glutenfrei
        elif any(ch in raw for ch in NEGATION_CHARS):
            negations += sum(raw.count(ch) for ch in NEGATION_CHARS)
        elif any(s in raw for s in NEGATION_KANA):
            negations += sum(raw.count(s) for s in NEGATION_KANA)
        elif any(s in raw for s in NEGATION_HANGUL):
            negations += sum(raw.count(s) for s in NEGATION_HANGUL)
        if role and plain not in _DETERMINERS:
            if len(roles) < MARKS_MAX:
                roles.add((plain, role))
            role = 0
        if lower in DIRECTION_MARKERS:
            directed = True
            role = 1 if lower == "from" else 2 if lower in _TO_MARKERS else 0
        if len(words) < WORDS_MAX:
            words.add(plain)
            if plain.endswith("ful") and len(plain) > 6:
                words.add(plain[:-3])  # "careful" stands for "care" against "careless"
        # language votes
        for lang in _LANG_OF.get(lower, ()):
            lang_votes[lang] = lang_votes.get(lang, 0) + 1
        # polarity: lexicon, then affixes
        pole = POLES.get(plain)
        if pole is not None:
            poles.add(pole)
        else:
            stem = _negated_stem(plain)
            if stem is not None and len(negated) < MARKS_MAX:
                negated.add(stem)
        if prev_word == "non" and len(negated) < MARKS_MAX:  # "non-transferable"
            negated.add(plain)
        # entities
        bigram = _ENTITY_BIGRAMS.get((prev_word, lower))
        canon = ENTITIES.get(plain)
        if bigram is not None:
            add_entity(bigram)
        elif canon is not None and not (canon == "march-month" or canon == "may-month"):
            if plain not in ("us",) or raw == "US":
                add_entity(canon)
        elif (plain in ("march", "may") and raw[:1].isupper() and not initial) or (
            _looks_named(raw, initial) and plain not in SCOPE
        ):
            add_entity(plain[:-1] if plain.endswith("s") and len(plain) > 4 else plain)
        # scope
        sc = SCOPE.get(plain)
        if lower == "up" and prev_word == "grown":
            scope.add("adult")
        elif sc is not None and plain not in _SCOPE_SKIP_IF_ENTITY and _scoped(tokens, i, sc):
            scope.add(sc)
        elif lower == "class" and prev_word in ("first", "business", "economy", "premium"):
            scope.add(prev_word + "-class")
        prev_word, prev_word_raw, prev_initial = lower, raw, initial
    flush_run()
    numbers = [n.canon() if isinstance(n, _Num) else n for n in nums]
    while numbers and not isinstance(nums[len(numbers) - 1], _Num):
        numbers.pop()  # a trailing operator is punctuation ("5 -")
    language = _language(lang_votes, scripts)

    d = _hasher(key)

    content, marks, paired = _content(text)
    return Features(
        numbers=d("\x00".join(numbers)) if numbers else 0,
        negations=negations,
        words=frozenset(d(w) for w in words),
        negated=frozenset(d(w) for w in negated),
        poles=frozenset((d(g), p, k) for g, p, k in poles),
        entities=tuple(d(e) for e in entities),
        scope=frozenset(d(s) for s in scope),
        directed=directed,
        language=language,
        roles=frozenset((d(w), r) for w, r in roles),
        content=tuple(d(w) for w in content),
        typos=tuple(_typos(d, w) for w in content),
        marks=tuple((d(m), n) for m, n in marks),
        paired=paired,
    )


def _typos(d: Callable[[str], int], word: str) -> tuple[int, ...]:
    if not TYPO_MIN <= len(word) <= TYPO_LONGEST:
        return ()
    return tuple(sorted({d(w) & 0xFFFF for w in (word, *_deletions(word))}))


_TIMES_WORDS = _wordset("once twice thrice")
_ORDINAL_WORDS = _wordset("first second third fourth fifth sixth seventh eighth ninth tenth")


def _counts(tokens: list[re.Match[str]], i: int, lower: str, prev_word: str) -> bool:
    """Is this number word a number? Not "one" as a pronoun or article ("which one", "on one
    charge"), nor a number word hyphenated to a word ("two-factor", "one-way")."""
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
        word = after.group().lower()
        return lower in _ORDINAL_WORDS or word in UNITS or word in UNIT_NAMES or word in SCALES
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
    if only_a and only_b:
        ta = [frozenset(a.typos[i]) if i < len(a.typos) else frozenset() for i in only_a]
        tb = [frozenset(b.typos[i]) if i < len(b.typos) else frozenset() for i in only_b]
        near_a = [any(x & y for y in tb) for x in ta]
        near_b = [any(y & x for x in ta) for y in tb]
        shared += min(sum(near_a), sum(near_b))
        only_a = [i for i, near in zip(only_a, near_a, strict=True) if not near]
        only_b = [i for i, near in zip(only_b, near_b, strict=True) if not near]
    return only_a, only_b, shared


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
    return b"".join(parts)


def unpack(data: bytes) -> Features:
    """pack() reversed; ValueError (or struct.error) when damaged."""
    version, neg, nums, nw, nn, np_, ne, ns, nr, directed, paired = _HEAD.unpack_from(data)
    if version != VERSION:
        raise ValueError("unknown guard record version")
    at = _HEAD.size
    llen = data[at]
    lang = data[at + 1 : at + 1 + llen].decode()
    at += 1 + llen

    def ints(n: int) -> tuple[int, ...]:
        nonlocal at
        out = struct.unpack_from(f"<{n}I", data, at)
        at += 4 * n
        return out

    words = ints(nw)
    negated = ints(nn)
    poles = []
    for _ in range(np_):
        poles.append(struct.unpack_from("<Ibb", data, at))
        at += 6
    entities = ints(ne)
    scope = ints(ns)
    roles = []
    for _ in range(nr):
        roles.append(struct.unpack_from("<Ib", data, at))
        at += 5
    (nc,) = struct.unpack_from("<H", data, at)
    at += 2
    content = ints(nc)
    typos = []
    for _ in range(nc):
        nt = data[at]
        typos.append(struct.unpack_from(f"<{nt}H", data, at + 1))
        at += 1 + 2 * nt
    nm = data[at]
    at += 1
    marks = []
    for _ in range(nm):
        marks.append(struct.unpack_from("<IH", data, at))
        at += 6
    if at != len(data):
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
    )
