"""The marketplace vocabulary of the synthetic generator: aisles, product types, variants, brands.

The vocabulary is written as a small line-based table (``_VOCAB``) and parsed once into
:class:`Vocabulary`, a set of flat numpy-friendly lists with global indices:

* **aisle** (25): the paper's aisle category, with query synonyms, an *aisle group* (aisles in
  one group are "related": an aisle query gets MR for them), an organic share and a weight
  (share of the catalog).
* **type group** (per aisle): related product types (cola / root beer are both ``soda``). A
  type query labels every product of the same type group MR. Each group owns its **variants**
  (flavour, scent, colour, strength), each with the RGB colour the packshot body is painted in.
* **product type** (per group): display name, query synonyms, allowed containers, amounts,
  pack counts and a base price.
* **brand**: invented names (:func:`brand_names`), generated per seed from syllables.

Line format of ``_VOCAB`` (fields separated by ``|``, lists by ``;``)::

    A name | synonyms | aisle group | organic share | weight
    G name | variant #rrggbb; variant #rrggbb; ...
    T name | synonyms | containers | amounts | pack counts | base price ($)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

CONTAINERS = ("can", "bottle", "box", "bag", "jar", "tube", "carton", "tub", "pouch", "tray", "pack")
CONTAINER_PLURAL = {"box": "Boxes", "pouch": "Pouches"}

# Query modifiers that do not change the intent (and so not the label).
MODIFIERS = ("pack", "bulk", "family size", "deal", "deals", "on sale", "cheap", "best", "near me", "delivery",
             "value pack", "multipack", "sale", "big", "small", "new", "for party", "for kids", "for home",
             "for office", "gift", "coupon", "low price", "top rated", "same day", "in stock", "brand", "buy",
             "store", "online", "2 pack", "6 pack", "12 pack", "24 pack", "travel size", "large size", "x2",
             "refill", "party size", "mini")

_VOCAB = """
A drinks | beverages; soft drinks; soda pop; drinks aisle | beverages | 0.03 | 1.4
G soda | original #c8102e; zero sugar #1a1a1a; cherry #7b1e3a; vanilla #efe3b3; lime #76c442; ginger #d9a441
T cola | cola soda; colas | can; bottle | 12 fl oz; 20 fl oz; 2 L | 1; 6; 12 | 0.9
T lemon-lime soda | lemon lime soda; citrus soda; clear soda | can; bottle | 12 fl oz; 2 L | 1; 6; 12 | 0.9
T root beer | root beer soda; rootbeer | can; bottle | 12 fl oz; 2 L | 1; 6; 12 | 0.9
T ginger ale | ginger soda | can; bottle | 12 fl oz; 1 L | 1; 6; 12 | 0.9
G water | unflavored #9fd3f0; lemon #f5e050; lime #9ad14b; berry #b0306a; peach #ff8c1a; grapefruit #f07b6a
T sparkling water | seltzer; fizzy water; carbonated water | can; bottle | 12 fl oz; 1 L | 1; 8; 12 | 0.6
T spring water | bottled water; still water | bottle | 16.9 fl oz; 1 gal | 1; 24 | 0.4
G juice | orange #f7941d; apple #c9dc4b; cranberry #a4133c; grape #5b2a86; pineapple #f3e600; mango #ffd27f
T juice | fruit juice; 100% juice | bottle; carton | 52 fl oz; 10 fl oz | 1; 6 | 3.2
T juice drink | fruit drink; juice cocktail | bottle; pouch | 6 fl oz; 64 fl oz | 1; 10 | 2.5
G energy | original #2a7ab0; sugar free #bfc5cc; tropical #ff7f50; berry #8b1e5a; citrus #f2c618
T energy drink | energy drinks; energy boost drink | can | 16 fl oz; 8.4 fl oz | 1; 4; 12 | 2.5
T sports drink | electrolyte drink; sports drinks | bottle | 28 fl oz; 20 fl oz | 1; 8 | 1.3
A alcohol | beer wine and spirits; liquor; booze; alcoholic drinks | beverages | 0.02 | 0.9
G beer | classic #d4a017; light #f2e6a0; citrus #f4f400; black cherry #4a0e2e; lime #7fbf3f; honey #8b5a00
T lager | lager beer; pilsner | can; bottle | 12 fl oz; 16 fl oz | 6; 12; 24 | 1.5
T ipa | india pale ale; hoppy beer; craft beer | can; bottle | 12 fl oz; 16 fl oz | 4; 6; 12 | 2.0
T hard seltzer | spiked seltzer; alcoholic seltzer | can | 12 fl oz | 6; 12 | 1.6
G wine | dry #6d0f1f; sweet #c2185b; reserve #1f0a3b; sparkling #f3e7b6; crisp #bcf60c
T red wine | cabernet; merlot; red | bottle | 750 ml; 1.5 L | 1 | 12
T white wine | chardonnay; sauvignon blanc | bottle | 750 ml; 1.5 L | 1 | 11
T rose wine | rose; blush wine | bottle | 750 ml | 1 | 12
G spirits | classic #c9a66b; honey #d99a1e; vanilla #efe3b3; peach #ff8c69; cinnamon #8b3a1a
T vodka | vodka spirit | bottle | 750 ml; 1.75 L | 1 | 18
T whiskey | whisky; bourbon | bottle | 750 ml; 1.75 L | 1 | 28
A coffee & tea | coffee and tea; hot drinks; coffee aisle | beverages | 0.12 | 0.9
G coffee | dark roast #3e2117; medium roast #7b4a2d; light roast #b07d4f; decaf #2e7d32; vanilla #efe3b3; hazelnut #e0a060
T ground coffee | coffee grounds; drip coffee | bag; can | 12 oz; 24 oz | 1 | 8.5
T whole bean coffee | coffee beans; whole beans | bag | 12 oz; 2 lb | 1 | 10
T coffee pods | k cups; coffee capsules; single serve coffee | box | 12 ct; 24 ct | 1 | 9
T cold brew | cold brew coffee; iced coffee | bottle; carton | 32 fl oz; 11 fl oz | 1; 4 | 5
G tea | black #2b1b17; green #5b8c3a; chamomile #f4d35e; peppermint #3cb371; earl grey #5d6d7e; chai #b5651d
T tea bags | tea; bagged tea | box | 20 ct; 40 ct; 100 ct | 1 | 4
T loose leaf tea | loose tea; leaf tea | bag; tub | 3 oz; 8 oz | 1 | 9
A snacks | snack food; chips and snacks; snack aisle | snacks | 0.1 | 1.5
G chips | sea salt #f5d76e; bbq #a0381c; sour cream & onion #66bb6a; cheddar #ff9f1c; jalapeno #2e8b57; salt & vinegar #4fc3f7
T potato chips | chips; crisps; kettle chips | bag | 1 oz; 8 oz; 13 oz | 1; 10 | 1.2
T tortilla chips | corn chips; nacho chips | bag | 11 oz; 1 oz | 1; 12 | 1.4
T pretzels | pretzel twists; pretzel sticks | bag | 16 oz; 1 oz | 1; 12 | 1.1
G crackers | original #e3c16f; whole wheat #a1744b; cheese #ff9f1c; rosemary #6b8e23; sesame #c0c0c0
T crackers | snack crackers; saltines | box | 9 oz; 13 oz | 1 | 2.5
T rice cakes | rice crisps; puffed rice cakes | bag | 4.5 oz | 1; 6 | 2
G nuts | salted #c68e3f; unsalted #e2c290; honey roasted #ffb000; smoked #6d4c41; chili lime #e53935
T almonds | roasted almonds | bag; jar | 6 oz; 16 oz | 1 | 4.5
T trail mix | nut mix; snack mix | bag | 10 oz; 26 oz | 1 | 4
T peanuts | roasted peanuts | jar; can | 16 oz; 34 oz | 1 | 2.6
A candy & chocolate | candy; sweets; chocolate; confectionery | snacks | 0.05 | 0.8
G chocolate | milk #7b3f00; dark #3b1f14; white #f3ead3; caramel #c68e3f; mint #98ff98; sea salt #9ec9e3
T chocolate bar | candy bar; chocolate bars | pack; box | 1.5 oz; 3.5 oz | 1; 6; 12 | 1.3
T chocolate truffles | truffles; chocolate pralines | box; bag | 5 oz; 8 oz | 1 | 5
G candy | strawberry #e53935; sour apple #7cb342; watermelon #ff69b4; blue raspberry #1e88e5; mixed fruit #ab47bc; cola #5d2e0c
T gummy bears | gummies; gummy candy | bag | 5 oz; 28 oz | 1 | 1.8
T hard candy | lollipops; candy drops | bag | 7 oz | 1 | 2
T chewing gum | gum; sugar free gum | pack | 14 ct | 1; 3 | 1.3
A breakfast & cereal | breakfast; breakfast foods; cereal aisle | pantry | 0.15 | 0.8
G cereal | honey #f2b134; chocolate #5d3a1a; berry #b0306a; cinnamon #b5651d; frosted #cfe8f3; original #4363d8
T breakfast cereal | cereal; corn flakes; cereals | box | 12 oz; 18 oz | 1; 2 | 3.6
T granola | granola clusters; muesli | bag; box | 12 oz; 24 oz | 1 | 4.5
T oatmeal | oats; rolled oats; porridge | box; tub | 18 oz; 42 oz | 1 | 3.2
G bars | peanut butter #c68e3f; chocolate chip #5d3a1a; oats & honey #ffd700; berry #b0306a; almond #e2c290
T granola bars | cereal bars; snack bars | box | 6 ct; 12 ct | 1 | 3.5
T protein bars | protein bar; energy bars | box | 4 ct; 12 ct | 1 | 7
A pantry | canned goods; pantry staples; canned food | pantry | 0.12 | 1.1
G canned | original #b0bec5; low sodium #64b5f6; spicy #e53935; garlic #f5f0e1; herb #6b8e23
T black beans | canned beans; beans | can | 15 oz; 29 oz | 1; 4 | 1.1
T diced tomatoes | canned tomatoes; chopped tomatoes | can | 14.5 oz; 28 oz | 1; 4 | 1.2
T chicken soup | soup; canned soup; chicken noodle soup | can; carton | 10.5 oz; 32 oz | 1; 4 | 1.8
T tuna | canned tuna; tuna fish | can; pouch | 5 oz | 1; 4 | 1.4
G spreads | creamy #c68e3f; crunchy #a0522d; strawberry #e53935; grape #5b2a86; honey #ffc400
T peanut butter | pb; nut butter | jar | 16 oz; 40 oz | 1 | 3.2
T jam | jelly; fruit preserves | jar | 12 oz; 18 oz | 1 | 3.4
A pasta & grains | pasta and rice; grains; pasta aisle | pantry | 0.12 | 0.8
G pasta | classic #f5deb3; whole wheat #a1744b; gluten free #ffe100; protein #ffb74d; spinach #558b2f
T spaghetti | spaghetti pasta; noodles | box; bag | 16 oz; 32 oz | 1 | 1.5
T penne | penne pasta; pasta tubes | box | 16 oz | 1 | 1.5
T macaroni and cheese | mac and cheese; mac n cheese | box | 7.25 oz | 1; 5 | 1.1
G grains | white #f5f5f5; brown #a1744b; jasmine #b3e5fc; basmati #ffcc80; wild #4e342e
T rice | long grain rice; rice bag | bag; box | 2 lb; 5 lb | 1 | 3
T quinoa | quinoa grain | bag | 12 oz; 2 lb | 1 | 5
A condiments & sauces | sauces; condiments; dressings | pantry | 0.06 | 0.9
G tomato sauces | classic #c62828; spicy #ff5722; garlic #f5f0e1; basil #43a047; mushroom #8d6e63
T pasta sauce | marinara; tomato sauce; spaghetti sauce | jar | 24 oz | 1; 2 | 3.2
T ketchup | tomato ketchup; catsup | bottle | 20 oz; 38 oz | 1 | 2.3
G dressings | ranch #f1f8e9; italian #ff8a65; balsamic #4e342e; caesar #fff59d; honey mustard #fbc02d
T salad dressing | dressing; vinaigrette | bottle | 16 fl oz | 1 | 3.3
T mayonnaise | mayo | jar; bottle | 30 fl oz; 12 fl oz | 1 | 4
G hot sauces | original #d32f2f; habanero #ff6f00; chipotle #6d4c41; garlic #f5f0e1; sweet chili #ff1493
T hot sauce | chili sauce; pepper sauce | bottle | 5 fl oz; 12 fl oz | 1 | 3
T salsa | chunky salsa; dip | jar | 16 oz; 24 oz | 1 | 3.3
A baking | baking supplies; flour and sugar; baking aisle | pantry | 0.1 | 0.6
G baking | all purpose #f5f5f5; whole wheat #a1744b; gluten free #ffe082; vanilla #d2b48c; chocolate #5d3a1a
T flour | baking flour; wheat flour | bag | 2 lb; 5 lb | 1 | 3
T cake mix | cake; brownie mix | box | 15 oz | 1 | 1.8
T baking chips | chocolate chips; chips for baking | bag | 12 oz | 1 | 3.5
G sugar | granulated #fafafa; brown #8d6e63; powdered #87ceeb; raw #d7ccc8; cane #ffe119
T sugar | cane sugar; white sugar | bag; box | 4 lb; 1 lb | 1 | 3
T baking soda | bicarbonate; soda bicarbonate | box | 16 oz | 1 | 1
A dairy & eggs | dairy; milk and eggs; dairy products | fresh | 0.2 | 1.3
G milk | whole #1565c0; 2% #e53935; skim #7e57c2; chocolate #5d3a1a; lactose free #26a69a; oat #d7b899
T milk | dairy milk; gallon of milk | carton; bottle | half gallon; 1 gal | 1 | 3.5
T yogurt | yoghurt; greek yogurt | tub; pack | 32 oz; 5.3 oz | 1; 4 | 1.4
G cheese | cheddar #ffa000; mozzarella #fffde7; swiss #fff59d; pepper jack #e65100; parmesan #c8b560
T shredded cheese | grated cheese; cheese | bag | 8 oz; 16 oz | 1 | 3.5
T cheese slices | sliced cheese; sandwich cheese | pack | 8 oz | 1 | 3.5
G eggs | large #fff3e0; brown #a1887f; free range #aed581; jumbo #ffb74d; pasture raised #008080
T eggs | egg; dozen eggs | carton | 12 ct; 18 ct | 1 | 3.2
T butter | salted butter; unsalted butter | box | 16 oz | 1 | 4.5
A bakery | baked goods; bakery items; fresh bakery | fresh | 0.12 | 0.9
G bread | white #fafafa; whole wheat #a1744b; multigrain #c49a6c; sourdough #d7ccc8; rye #5d4037; honey wheat #ffb74d
T sandwich bread | bread; loaf; sliced bread | bag | 20 oz; 24 oz | 1 | 3
T bagels | bagel | bag | 6 ct | 1 | 3.5
T tortillas | wraps; flour tortillas | bag | 8 ct; 20 ct | 1 | 2.8
G sweet bakery | blueberry #3f51b5; chocolate #5d3a1a; cinnamon #b5651d; lemon #f5e050; vanilla #efe3b3
T muffins | muffin | box; pack | 4 ct | 1 | 4
T cookies | cookie; biscuits | bag; box | 13 oz; 7 oz | 1 | 3.5
A produce | fruits and vegetables; fresh produce; veggies; fruit | fresh | 0.3 | 1.2
G fruit | red #d32f2f; green #7cb342; yellow #fdd835; honeycrisp #8b0000; gala #ff7043
T apples | apple; fresh apples | bag | 3 lb; 5 lb | 1 | 4.5
T bananas | banana | bag | 2 lb; 3 lb | 1 | 1.5
T grapes | seedless grapes | bag; tray | 2 lb | 1 | 5
G vegetables | baby #9ccc65; heirloom #43a047; sweet #ffca28; mixed #ff7043; rainbow #ab47bc
T carrots | baby carrots | bag | 1 lb; 2 lb | 1 | 1.5
T salad mix | salad; lettuce; mixed greens | bag; tub | 5 oz; 10 oz | 1 | 3.5
T potatoes | potato; russet potatoes | bag | 5 lb | 1 | 4
A meat & seafood | meat; seafood; butcher | fresh | 0.1 | 0.8
G meat | lean #e57373; boneless #f5deb3; grass fed #66bb6a; seasoned #b5651d; family pack #bcaaa4
T chicken breast | chicken; boneless chicken | tray | 1 lb; 3 lb | 1 | 6
T ground beef | beef; hamburger meat | tray | 1 lb; 3 lb | 1 | 6.5
T bacon | bacon strips | pack | 12 oz; 16 oz | 1 | 6
G fish | wild #1e88e5; atlantic #ef6c00; smoked #6d4c41; lemon pepper #fff176; garlic butter #fffde7
T salmon fillet | salmon; fish fillet | tray; pack | 12 oz; 1 lb | 1 | 10
T shrimp | prawns; frozen shrimp | bag | 1 lb; 2 lb | 1 | 9
A deli | deli meats; lunch meat; deli counter | frozen & deli | 0.08 | 0.6
G deli | smoked #8d6e63; honey #f2b134; black pepper #424242; mesquite #a0522d; oven roasted #ffab91
T sliced turkey | turkey; deli turkey | pack; tub | 9 oz; 16 oz | 1 | 5
T sliced ham | ham; deli ham | pack | 9 oz; 16 oz | 1 | 5
T hummus | hummus dip; chickpea dip | tub | 10 oz | 1 | 3.8
A frozen | frozen foods; frozen meals; freezer | frozen & deli | 0.08 | 1.0
G frozen meals | pepperoni #c62828; cheese #ffca28; supreme #6d4c41; margherita #43a047; bbq chicken #8b2500
T frozen pizza | pizza; frozen pizzas | box | 12 in; 21 oz | 1 | 6
T frozen dinner | tv dinner; frozen meal | box; tray | 10 oz | 1; 4 | 3.5
G frozen treats | vanilla #efe3b3; chocolate #5d3a1a; strawberry #e53935; cookies & cream #9e9e9e; mint chip #98ff98
T ice cream | icecream; gelato | tub | 48 fl oz; 16 fl oz | 1 | 5
T frozen fruit | frozen berries; fruit for smoothies | bag | 16 oz; 48 oz | 1 | 4.5
A medicine | pharmacy; medicine cabinet; otc medicine; health | health | 0.0 | 0.8
G pain relief | ibuprofen #e65100; acetaminophen #46f0f0; naproxen #1565c0; aspirin #eeeeee; extra strength #6a1b9a
T pain reliever | pain relief; painkiller; headache pills | bottle; box | 100 ct; 24 ct | 1 | 8
T pain relief gel | muscle rub; pain cream | tube | 3 oz | 1 | 9
G cold & flu | daytime #ffb300; nighttime #283593; honey lemon #fff176; cherry #7b1e3a; menthol #4dd0e1
T cold medicine | cold and flu; flu medicine | box; bottle | 24 ct; 8 fl oz | 1 | 9
T cough syrup | cough medicine | bottle | 4 fl oz; 8 fl oz | 1 | 8
T throat lozenges | cough drops; lozenges | bag; box | 30 ct | 1 | 3
G allergy | 24 hour #7e57c2; non drowsy #26a69a; children's #ff80ab; original #90a4ae
T allergy relief | allergy pills; antihistamine | box; bottle | 30 ct; 70 ct | 1 | 12
T nasal spray | nose spray; saline spray | bottle | 1 fl oz | 1 | 10
A vitamins & supplements | supplements; nutrition; vitamins and supplements | health | 0.2 | 0.6
G vitamins | gummy #ec407a; tablet #90caf9; extra strength #6a1b9a; orange #fb8c00; berry #b0306a
T multivitamin | vitamins; daily vitamin; multivitamins | bottle | 100 ct; 200 ct | 1 | 11
T vitamin c | vitamin c tablets; immune support | bottle | 100 ct | 1 | 8
T fish oil | omega 3; omega-3 | bottle | 120 ct | 1 | 13
G protein | chocolate #5d3a1a; vanilla #efe3b3; strawberry #e53935; unflavored #eceff1; cookies & cream #9e9e9e
T protein powder | whey protein; protein shake mix | tub; bag | 2 lb; 5 lb | 1 | 28
A personal care | toiletries; bath and body; hygiene | personal | 0.1 | 1.0
G body | lavender #9575cd; coconut #efebe9; unscented #b0bec5; cucumber #aed581; shea butter #ffcc80; ocean #0288d1
T body wash | shower gel; bath soap | bottle | 16 fl oz; 22 fl oz | 1 | 6
T bar soap | soap; hand soap bar | box; pack | 4 ct; 8 ct | 1 | 5
T deodorant | antiperspirant; deo | tube; pack | 2.6 oz | 1; 2 | 5
G hair | moisturizing #4fc3f7; volumizing #f06292; repair #7e57c2; tea tree #43a047; argan oil #ffb300
T shampoo | hair wash; shampoos | bottle | 12 fl oz; 28 fl oz | 1 | 6
T conditioner | hair conditioner | bottle | 12 fl oz; 28 fl oz | 1 | 6
G oral | mint #26c6da; whitening #eceff1; cinnamon #b5651d; sensitive #90caf9; charcoal #212121
T toothpaste | tooth paste; fluoride toothpaste | tube; box | 4 oz; 6 oz | 1; 2 | 3.5
T mouthwash | mouth rinse; oral rinse | bottle | 16 fl oz; 1 L | 1 | 5
A baby | baby care; infant; baby products; nursery | baby | 0.15 | 0.6
G diapering | newborn #f8bbd0; size 1 #b3e5fc; size 3 #c5e1a5; size 5 #ffe082; sensitive #eceff1
T diapers | nappies; baby diapers | pack; box | 32 ct; 84 ct | 1 | 14
T baby wipes | wipes; wet wipes | pack | 72 ct; 3 x 72 ct | 1 | 4
G baby food | apple #c9dc4b; pear #a8e6cf; sweet potato #ff8a65; banana #ffd700; peas #7cb342
T baby food | baby puree; infant food | jar; pouch | 4 oz | 1; 6 | 1.5
T infant formula | formula; baby formula | tub; can | 20 oz; 30 oz | 1 | 24
A pet care | pet supplies; pets; pet food | pet | 0.05 | 0.8
G dog | chicken #ffb74d; beef #8d6e63; lamb #bcaaa4; salmon #fa8072; puppy #81d4fa
T dry dog food | dog food; kibble | bag | 4 lb; 30 lb | 1 | 12
T dog treats | dog biscuits; dog chews | bag; box | 16 oz | 1 | 6
G cat | tuna #90a4ae; chicken #ffb74d; salmon #fa8072; turkey #8b5a2b; kitten #f8bbd0
T cat food | wet cat food; canned cat food | can; pouch | 3 oz; 5.5 oz | 1; 12; 24 | 0.9
T cat litter | kitty litter; clumping litter | box; bag | 14 lb; 25 lb | 1 | 11
A household cleaning | cleaning supplies; cleaners; household | home | 0.08 | 0.9
G cleaners | lemon #fdd835; lavender #9575cd; fresh #4fc3f7; pine #2e7d32; unscented #eceff1; orange #fb8c00
T all purpose cleaner | multi surface cleaner; spray cleaner | bottle | 32 fl oz | 1; 2 | 4
T dish soap | dishwashing liquid; dish detergent | bottle | 19 fl oz; 38 fl oz | 1 | 3.5
T disinfecting wipes | cleaning wipes; sanitizing wipes | tub; pack | 75 ct | 1; 3 | 5.5
T dishwasher pods | dishwasher detergent; dishwasher tabs | tub; bag | 32 ct; 62 ct | 1 | 12
A laundry | laundry supplies; laundry care; washing | home | 0.06 | 0.6
G laundry | original #ff6f00; free & clear #eceff1; spring #81c784; lavender #9575cd; ocean #0288d1
T laundry detergent | detergent; washing liquid | bottle | 92 fl oz; 150 fl oz | 1 | 12
T laundry pods | detergent pods; washing pods | tub; bag | 42 ct; 81 ct | 1 | 14
T fabric softener | softener; dryer sheets | bottle; box | 64 fl oz; 120 ct | 1 | 6
A paper & plastic | paper goods; paper towels and toilet paper; household paper | home | 0.03 | 0.6
G paper | ultra soft #f8bbd0; ultra strong #64b5f6; recycled #a5d6a7; select a size #fff59d; mega roll #b39ddb
T paper towels | kitchen towels; paper towel | pack | 6 rolls; 12 rolls | 1 | 9
T toilet paper | bath tissue; toilet tissue | pack | 12 rolls; 24 rolls | 1 | 10
T facial tissues | tissues; kleenex | box | 120 ct | 1; 3 | 2.2
G bags | drawstring #90a4ae; scented #ce93d8; heavy duty #424242; clear #e0f7fa
T trash bags | garbage bags; bin bags | box | 13 gal; 30 gal | 1 | 9
T food storage bags | zipper bags; sandwich bags; freezer bags | box | 50 ct | 1 | 4
"""


@dataclass(frozen=True)
class ProductType:
    name: str
    synonyms: tuple[str, ...]
    containers: tuple[str, ...]
    amounts: tuple[str, ...]
    packs: tuple[int, ...]
    base_price: float
    group: int  # global type-group index
    aisle: int


@dataclass(frozen=True)
class TypeGroup:
    name: str
    aisle: int
    variants: tuple[int, ...]  # global variant indices


@dataclass(frozen=True)
class Aisle:
    name: str
    synonyms: tuple[str, ...]
    group: str
    organic_share: float
    weight: float


@dataclass
class Vocabulary:
    """The parsed vocabulary: flat lists with global indices (aisle, group, type, variant)."""

    aisles: list[Aisle] = field(default_factory=list)
    groups: list[TypeGroup] = field(default_factory=list)
    types: list[ProductType] = field(default_factory=list)
    variant_names: list[str] = field(default_factory=list)
    variant_rgb: list[tuple[int, int, int]] = field(default_factory=list)
    variant_group: list[int] = field(default_factory=list)

    @cached_property
    def aisle_group_ids(self) -> np.ndarray:
        """``[n_aisles]`` int: index of each aisle's aisle group."""
        names = sorted({a.group for a in self.aisles})
        return np.array([names.index(a.group) for a in self.aisles], dtype=np.int64)

    @cached_property
    def type_aisle(self) -> np.ndarray:
        return np.array([t.aisle for t in self.types], dtype=np.int64)

    @cached_property
    def type_group(self) -> np.ndarray:
        return np.array([t.group for t in self.types], dtype=np.int64)

    def words(self) -> set[str]:
        """Every lower-case word of the vocabulary (brand names must avoid them)."""
        text = [a.name for a in self.aisles] + [s for a in self.aisles for s in a.synonyms]
        text += [t.name for t in self.types] + [s for t in self.types for s in t.synonyms]
        text += self.variant_names + list(MODIFIERS)
        return {w for phrase in text for w in phrase.lower().split()}


def _split(field_text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in field_text.split(";") if p.strip())


def _rgb(hex_code: str) -> tuple[int, int, int]:
    return int(hex_code[1:3], 16), int(hex_code[3:5], 16), int(hex_code[5:7], 16)


@lru_cache(maxsize=1)
def vocabulary() -> Vocabulary:
    """Parse ``_VOCAB`` (cached). Raises ``ValueError`` on a malformed line."""
    vocab = Vocabulary()
    for lineno, line in enumerate(_VOCAB.strip().splitlines(), 1):
        kind, _, rest = line.partition(" ")
        parts = [p.strip() for p in rest.split("|")]
        if kind == "A" and len(parts) == 5:
            vocab.aisles.append(Aisle(parts[0], _split(parts[1]), parts[2], float(parts[3]), float(parts[4])))
        elif kind == "G" and len(parts) == 2:
            first = len(vocab.variant_names)
            for item in _split(parts[1]):
                name, _, colour = item.rpartition(" ")
                vocab.variant_names.append(name)
                vocab.variant_rgb.append(_rgb(colour))
                vocab.variant_group.append(len(vocab.groups))
            vocab.groups.append(TypeGroup(parts[0], len(vocab.aisles) - 1,
                                          tuple(range(first, len(vocab.variant_names)))))
        elif kind == "T" and len(parts) == 6:
            containers = _split(parts[2])
            unknown = set(containers) - set(CONTAINERS)
            if unknown:
                raise ValueError(f"vocab line {lineno}: unknown containers {sorted(unknown)}")
            vocab.types.append(ProductType(parts[0], _split(parts[1]), containers, _split(parts[3]),
                                           tuple(int(p) for p in _split(parts[4])), float(parts[5]),
                                           len(vocab.groups) - 1, len(vocab.aisles) - 1))
        else:
            raise ValueError(f"vocab line {lineno}: cannot parse {line!r}")
    return vocab


_ONSETS = ("b", "br", "c", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k", "kl", "l", "m",
           "n", "p", "pl", "pr", "qu", "r", "s", "sn", "sp", "st", "t", "tr", "v", "w", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ee", "oo", "ai", "ou")
_MIDDLES = ("b", "bb", "c", "d", "f", "g", "l", "ll", "m", "n", "nd", "nn", "p", "r", "rr", "s", "t", "tt", "v", "x",
            "z", "zz")
_VOWEL_ENDINGS = ("a", "o", "io", "ix", "on", "et", "ora", "ana", "ella", "ex", "ia", "os", "um", "er", "ette", "ino",
                  "aro", "isk", "y", "ie")
_CONSONANT_ENDINGS = ("ly", "ra", "ful", "wise", "ley", "co", "bury", "ton", "ster", "field", "go", "mark")


def brand_names(rng: np.random.Generator, n: int, avoid: set[str]) -> list[str]:
    """``n`` distinct invented brand names (e.g. "Fizzly", "Crunora"), none a word in ``avoid``.

    A name is onset + vowel + (consonant + vowel ending | consonant ending): "Fizzora", "Brooly".
    """
    names: list[str] = []
    seen = set(avoid)
    while len(names) < n:
        batch = max(64, 2 * (n - len(names)))
        onset, vowel, middle, v_end, c_end, pattern = (
            rng.integers(0, len(p), batch) for p in (_ONSETS, _VOWELS, _MIDDLES, _VOWEL_ENDINGS, _CONSONANT_ENDINGS,
                                                     (0, 1, 2)))
        for o, v, m, ve, ce, pat in zip(onset, vowel, middle, v_end, c_end, pattern):
            tail = _CONSONANT_ENDINGS[ce] if pat == 0 else _MIDDLES[m] + _VOWEL_ENDINGS[ve]
            name = (_ONSETS[o] + _VOWELS[v] + tail).capitalize()
            if name.lower() not in seen:
                seen.add(name.lower())
                names.append(name)
                if len(names) == n:
                    break
    return names
