#!/usr/bin/env python3
"""Build quantyard/engine/data/evaluation/evaluation.txt, the default evaluation text.

Sources (see quantyard/engine/data/evaluation/README.md for the licences):
  1. Python's Language Reference as it ships with every Python (pydoc_data.topics), a fixed list
     of topics: English technical prose with inline code.
  2. Standard-library source files (textwrap, fnmatch, graphlib, colorsys): code
     with docstrings and comments.
  3. The CJK sample texts of CPython's test suite (test/cjkencodings/*-utf8.txt): Japanese,
     Chinese (simplified and traditional) and Korean prose.
  4. Short original paragraphs in eleven other languages written for Quantyard (below, CC0).

The output depends on the Python that runs this (its pydoc_data and Lib/); the committed text was
built with CPython 3.11.7. It is separate from the imatrix calibration text (engine/data/
calibration.txt): an evaluation on the text the quantizer was tuned for would flatter it.

    usage: python3 scripts/make-evaluation-text.py [OUT]
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

# ~100 kB: ~28k tokens with SmolLM2's 49k vocabulary, 54 chunks of 512 (llama-perplexity's default)
TOPICS = ("execmodel", "naming", "import", "exceptions", "try", "with", "function", "class",
          "numeric-types")
MODULES = ("textwrap.py", "fnmatch.py", "graphlib.py", "colorsys.py")
CJK = ("euc_jp-utf8.txt", "gb18030-utf8.txt", "euc_kr-utf8.txt", "big5-utf8.txt")

PROSE = {
    "Deutsch": (
        "Am Rand der kleinen Stadt stand eine alte Mühle, deren Rad sich schon lange nicht mehr "
        "drehte. Die Kinder des Dorfes erzählten sich, dass dort nachts ein Müller mit einer Laterne "
        "umhergehe und die Säcke zähle, die er vor hundert Jahren nicht verkauft habe. Im Frühling "
        "wuchsen Brennnesseln bis an die Fenster, und im Herbst sammelte sich das Laub im leeren "
        "Mühlbach. Als die Gemeinde beschloss, das Gebäude zu einem Museum umzubauen, fanden die "
        "Handwerker unter den Dielen tatsächlich ein Heft: Es enthielt Rechnungen, Wetterberichte "
        "und, auf der letzten Seite, ein Rezept für Roggenbrot mit Kümmel."
    ),
    "Français": (
        "Le train de nuit quitta la gare avec vingt minutes de retard. Dans le compartiment, une "
        "femme lisait un guide des champignons, un étudiant révisait ses formules de thermodynamique "
        "et un vieil homme regardait défiler les lumières des villages. Vers minuit, le contrôleur "
        "annonça qu'un arbre était tombé sur la voie et que le convoi resterait immobilisé jusqu'à "
        "l'aube. Personne ne se plaignit vraiment : l'étudiant sortit un thermos de café, la femme "
        "partagea des biscuits, et le vieil homme raconta comment, en 1962, il avait traversé les "
        "Alpes à vélo avec une carte dessinée à la main."
    ),
    "Español": (
        "La biblioteca del barrio abría a las nueve, pero a las ocho y media ya había una fila de "
        "personas en la puerta. Algunos venían a leer el periódico, otros a usar los ordenadores y "
        "unos pocos, los más constantes, a jugar al ajedrez en la mesa del fondo. La bibliotecaria "
        "conocía a todos por su nombre y sabía qué libro había pedido cada uno. Cuando el "
        "ayuntamiento anunció que reduciría el horario, los vecinos organizaron una colecta, "
        "pintaron las paredes un sábado y consiguieron que la sala siguiera abierta por las tardes."
    ),
    "Italiano": (
        "Ogni estate la nonna preparava la conserva di pomodoro nel cortile, con una pentola così "
        "grande che ci volevano due persone per spostarla. I nipoti lavavano i barattoli, il nonno "
        "accendeva il fuoco e i vicini passavano a dare consigli che nessuno aveva chiesto. Alla fine "
        "della giornata le bottiglie venivano allineate sul muretto ad asciugare, e ognuno tornava a "
        "casa con le mani rosse e il profumo di basilico nei vestiti."
    ),
    "Português": (
        "O pescador acordou antes do sol, verificou as redes e empurrou o barco para a água. O mar "
        "estava calmo, mas ele conhecia bem aquela calma: às vezes durava o dia inteiro, outras vezes "
        "desaparecia em meia hora. Levou pão, queijo e uma garrafa de água, e deixou um bilhete à "
        "filha dizendo que voltaria antes do almoço. Voltou ao meio-dia com o barco cheio de "
        "sardinhas e uma história sobre um golfinho que o acompanhara até ao farol."
    ),
    "Nederlands": (
        "De fietsenmaker in de Kerkstraat repareert al veertig jaar banden, remmen en kettingen. "
        "Zijn werkplaats ruikt naar olie en rubber, en aan de muur hangen foto's van klanten die "
        "met hun fiets naar Rome, Kopenhagen of Istanboel zijn gereden. Hij vraagt nooit meer dan "
        "nodig is en legt elke reparatie uit, ook als niemand erom vraagt."
    ),
    "Polski": (
        "Zimą jezioro zamarzało tak mocno, że mieszkańcy wsi skracali sobie drogę do miasta, idąc "
        "po lodzie. Dzieci jeździły na łyżwach aż do zmroku, a starsi łowili ryby przez przerębel, "
        "siedząc na drewnianych skrzynkach. Wiosną lód pękał z hukiem, który słychać było w całej "
        "dolinie, i wtedy wszyscy wiedzieli, że trzeba szykować łodzie."
    ),
    "Русский": (
        "Каждое утро учительница математики приходила в школу на полчаса раньше, чтобы написать на "
        "доске задачу дня. Задачи были разные: про поезда, которые выходят навстречу друг другу, "
        "про бассейн с двумя трубами, про шахматную доску и зёрна пшеницы. Ученики спорили о решениях "
        "на переменах, а лучшие ответы она вывешивала на стене в коридоре. Через много лет бывшие "
        "ученики писали ей письма и признавались, что до сих пор помнят задачу о трёх мудрецах."
    ),
    "Türkçe": (
        "Eski çarşının en dar sokağında küçük bir çay ocağı vardı. Sabahları esnaf oraya uğrar, "
        "ince belli bardaklarda çay içer, günün haberlerini konuşurdu. Ocağın sahibi herkesin çayını "
        "nasıl sevdiğini bilirdi: kimi açık, kimi demli, kimi iki şekerli. Yıllar sonra çarşı "
        "yenilendiğinde bile o küçük dükkân yerinde kaldı."
    ),
    "Ελληνικά": (
        "Το μικρό λιμάνι γέμιζε βάρκες κάθε απόγευμα. Οι ψαράδες καθάριζαν τα δίχτυα τους, τα παιδιά "
        "βουτούσαν από την προβλήτα και οι γάτες περίμεναν υπομονετικά κάποιο ψάρι που θα έπεφτε "
        "στο έδαφος. Όταν ο ήλιος έδυε πίσω από το νησί, τα καφενεία άναβαν τα φώτα τους."
    ),
    "हिन्दी": (
        "गाँव के बीच में एक पुराना बरगद का पेड़ था, जिसके नीचे शाम को लोग इकट्ठा होते थे। बुज़ुर्ग "
        "खेती और मौसम की बातें करते, बच्चे उसकी जड़ों पर झूलते, और कभी-कभी कोई कहानीकार पुरानी "
        "कहानियाँ सुनाता। बारिश के दिनों में वही पेड़ सबको छाया और आश्रय देता था।"
    ),
}


def build() -> str:
    import pydoc_data.topics as topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = ["# The Python Language Reference (excerpts)\n"]
    parts += [topics.topics[name].strip() + "\n" for name in TOPICS]
    for name in MODULES:
        parts.append(f"# ---- Lib/{name} ----\n" + (stdlib / name).read_text(encoding="utf-8"))
    parts.append("# ---- CJK sample texts (CPython test suite) ----\n")
    for name in CJK:
        parts.append((stdlib / "test" / "cjkencodings" / name).read_text(encoding="utf-8").strip() + "\n")
    parts.append("# ---- Short texts in other languages ----\n")
    parts += [f"{lang}: {text}\n" for lang, text in PROSE.items()]
    return "\n".join(parts)


def main() -> None:
    default = Path(__file__).resolve().parents[1] / "quantyard/engine/data/evaluation/evaluation.txt"
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build(), encoding="utf-8")
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
