"""Generate the bundled synthetic dialogue–summary dataset (SAMSum's shape).

    python -m offline.build_dataset [--out data/samples] [--seed 20261128]

Each example is a short chat between friends, family or colleagues, built from one of
twenty everyday scenarios with random names, places, times and objects, and a one- or
two-sentence third-person summary that only uses facts stated in the dialogue. Same seed,
same bytes: the files are committed and a test regenerates them to compare.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20261128
DEFAULT_OUT = Path("data/samples")
SPLIT_SIZES = {"train": 320, "validation": 40, "test": 40}

Turn = tuple[str, str]  # (speaker, text)
Scene = tuple[list[Turn], str]  # (turns, summary)

NAMES = [
    "Anna", "Tom", "Zoë", "José", "Mia", "Liam", "Priya", "Kenji", "Fatima", "Lucas",
    "Chloé", "Omar", "Ingrid", "Mateo", "Aisha", "Björn", "Sofia", "Kwame", "Hannah", "Diego",
    "Mei", "Noah", "Leila", "Ivan", "Grace", "Rahul", "Emma", "Tariq", "Olga", "Ben",
    "Yuki", "Amara", "Felix", "Nadia", "Sean", "Lucía", "Hiro", "Jana", "Marek", "Søren",
]  # fmt: skip
EATERIES = [
    "the Italian place", "Luigi's", "the sushi bar", "Café Nova", "the Thai restaurant",
    "the food court", "the Blue Door café", "the pub on Main Street", "the bakery by the station",
    "Pizza Corner", "the noodle bar", "the rooftop bar", "Crêperie Soleil",
]  # fmt: skip
TIMES = ["noon", "1 pm", "6:30", "7 pm", "8 pm", "5:15", "10 am", "3 pm", "9:30", "4:45", "11 am"]
DAYS = [
    "tomorrow", "tonight", "on Friday", "on Saturday", "on Sunday", "next Monday",
    "on Wednesday", "this afternoon", "on Thursday",
]  # fmt: skip
LENDABLES = [
    "drill", "tent", "phone charger", "umbrella", "bike", "ladder", "projector", "suitcase",
    "blender", "hair dryer", "board game", "calculator", "guitar", "sleeping bag",
]  # fmt: skip
LOSABLES = [  # (item, pronoun)
    ("keys", "them"), ("wallet", "it"), ("scarf", "it"), ("glasses", "them"), ("headphones", "them"),
    ("phone", "it"), ("gloves", "them"), ("notebook", "it"), ("ID card", "it"),
]  # fmt: skip
LOST_SPOTS = [
    "the gym", "the office kitchen", "the cinema", "Luigi's", "the bus stop", "the library",
    "your car", "the park", "the party", "the lecture hall",
]  # fmt: skip
GIFTS = [
    "a cookbook", "a scented candle", "concert tickets", "a yoga mat", "a plant", "a watch",
    "a board game", "a photo album", "headphones", "a spa voucher", "a wool scarf",
]  # fmt: skip
DISHES = [
    ("lasagne", "a pinch of nutmeg"), ("banana bread", "very ripe bananas"),
    ("chicken curry", "coconut milk"), ("guacamole", "lots of lime"),
    ("pancakes", "sparkling water in the batter"), ("tiramisu", "strong espresso"),
    ("paella", "smoked paprika"), ("borscht", "a splash of vinegar"),
    ("miso soup", "good dashi"), ("apple pie", "cold butter"),
]  # fmt: skip
DESTINATIONS = [
    "the lake", "the mountains", "Lisbon", "the seaside", "Prague", "the national park", "Kraków",
    "the coast",
]  # fmt: skip
TRANSPORT = [  # (what the dialogue says, how the summary puts it)
    ("I can drive", "by car"), ("let's take the train", "by train"), ("the bus is cheapest", "by bus"),
]  # fmt: skip
DOCUMENTS = [
    "quarterly report", "budget plan", "project proposal", "client presentation", "grant application",
]  # fmt: skip
PETS = [
    ("dog", "Max"), ("cat", "Luna"), ("rabbit", "Coco"), ("parrot", "Kiwi"),
    ("hamster", "Peanut"), ("dog", "Bruno"), ("cat", "Miso"), ("turtle", "Flash"),
]  # fmt: skip
MOVIES = [
    ("The Silent Harbor", "thriller"), ("Night Train to Oslo", "drama"), ("Space Llamas", "comedy"),
    ("The Last Orchard", "drama"), ("Midnight Circuit", "sci-fi"), ("Paper Hearts", "romance"),
    ("Ghosts of Ember Lane", "horror"), ("Operation Pancake", "comedy"),
]  # fmt: skip
CAR_PROBLEMS = [  # (what the dialogue says, how the summary puts it)
    ("won't start", "won't start"), ("has a flat tyre", "has a flat tyre"),
    ("is making a weird noise", "is making a strange noise"), ("battery is dead", "has a dead battery"),
]  # fmt: skip
SUBJECTS = ["maths", "chemistry", "history", "statistics", "French", "biology", "economics", "law"]
GRADES = ["an A", "a B", "a B+", "an A-", "85%", "92%"]
MONTHS = ["June", "September", "January", "March"]
STORES = ["the supermarket", "the corner shop", "Lidl", "the market", "the pharmacy", "the bakery"]
GROCERIES = [
    "milk", "eggs", "bread", "tomatoes", "coffee", "rice", "cheese", "apples", "toilet paper",
    "butter", "onions", "yoghurt", "pasta", "bananas",
]  # fmt: skip
DISTRICTS = ["the old town", "Riverside", "Greenhill", "the city centre", "Oak Park", "Harbour district"]
RENTS = ["900 euros", "1,200 euros", "750 pounds", "1,050 dollars", "1,400 euros"]
SPORTS = ["tennis", "badminton", "squash", "football", "table tennis", "basketball"]
BANDS = ["The Paper Kites", "Moonlit Avenue", "Los Tigres del Sur", "Velvet Static", "Nordlys"]
PRICES = ["30 euros", "45 euros", "25 pounds", "60 dollars", "35 euros"]
DESSERTS = ["a cheesecake", "brownies", "fruit salad", "ice cream", "a chocolate cake", "cookies"]
ILLNESSES = [  # (what the dialogue says, how the summary puts it)
    ("I've got a terrible cold 🤧", "is ill"), ("I have a fever", "is ill"),
    ("my boss wants me to stay late", "has to work late"),
    ("my sister is visiting unexpectedly", "has family visiting"),
    ("I'm completely exhausted", "is too tired"),
]  # fmt: skip
LATE_REASONS = [  # (what the dialogue says, how the summary puts it)
    ("my train is delayed", "the train is delayed"), ("I'm stuck in traffic", "of traffic"),
    ("I overslept 🙈", "of oversleeping"), ("I missed the bus", "of a missed bus"),
    ("there's a huge queue at the petrol station", "of a queue at the petrol station"),
]  # fmt: skip

GREETINGS = ["Hi!", "Hey 👋", "Hello", "hey there", "Hi {other}", "Morning!", "yo"]
GREETING_REPLIES = ["Hi 😊", "Hey!", "Hello {other}", "hiya", "Hey, what's up?"]
CLOSINGS = ["Thanks!", "Great, thanks 🙏", "Perfect", "See you!", "👍", "ok cool", "Thank you so much!"]
CLOSING_REPLIES = ["No problem 😊", "Anytime!", "Bye!", "😘", "You're welcome", "Cheers"]


def sentence_start(text: str) -> str:
    """Upper-case the first letter only (str.capitalize would lower-case "Café Nova")."""
    return text[:1].upper() + text[1:]


def meet_up(rng: random.Random, a: str, b: str, c: str) -> Scene:
    place, day = rng.choice(EATERIES), rng.choice(DAYS)
    early, late = rng.sample(TIMES, 2)
    variant = rng.randrange(4)
    if variant == 3:
        turns = [(a, f"Lunch at {place} at {early} {day}?"), (b, "Sure, see you there!")]
        return turns, f"{a} and {b} will have lunch at {place} at {early} {day}."
    if variant == 0:
        turns = [(a, f"Are you free {day}? Lunch at {place}?"), (b, "Sure! What time?"),
                 (a, f"{early}?"), (b, "Perfect, see you there")]  # fmt: skip
        return turns, f"{a} and {b} will meet at {place} at {early} {day}."
    if variant == 1:
        turns = [(a, f"Let's meet at {place} at {early} {day}"),
                 (b, f"{early} is too early for me, can we do {late}?"),
                 (a, f"Sure, {late} it is")]  # fmt: skip
        return turns, f"{a} and {b} will meet at {place} at {late} {day}."
    turns = [(a, f"Fancy a coffee {day}?"), (b, f"Yes please! {sentence_start(place)}?"),
             (a, f"Good idea. {early}?"), (b, "Deal ☕")]  # fmt: skip
    return turns, f"{a} and {b} are meeting for coffee at {place} at {early} {day}."


def borrow(rng: random.Random, a: str, b: str, c: str) -> Scene:
    thing, day = rng.choice(LENDABLES), rng.choice(DAYS)
    variant = rng.randrange(4)
    if variant == 3:
        turns = [(a, f"Could I borrow your {thing} {day}?"), (b, "Sure, I'll bring it 👌")]
        return turns, f"{b} will lend {a} the {thing} {day}."
    if variant == 0:
        turns = [(a, f"Can I borrow your {thing}?"), (b, "Sure, when do you need it?"),
                 (a, f"{sentence_start(day)} if possible"),
                 (b, f"No problem, I'll bring it {day}")]  # fmt: skip
        return turns, f"{b} will lend {a} the {thing} {day}."
    if variant == 1:
        turns = [(a, f"Do you still have that {thing}? Could I borrow it for a few days?"),
                 (b, f"Sorry, I lent it to {c} last week"), (a, f"Oh ok, I'll ask {c} then")]  # fmt: skip
        return turns, f"{a} wants to borrow {b}'s {thing}, but {b} lent it to {c}. {a} will ask {c}."
    turns = [(a, f"Hey, is your {thing} free {day}? Mine broke 😩"),
             (b, "Yes, come and pick it up whenever"), (a, "You're a star"),
             (b, "Just bring it back by next week pls")]  # fmt: skip
    return turns, f"{a} will pick up {b}'s {thing} and return it by next week."


def running_late(rng: random.Random, a: str, b: str, c: str) -> Scene:
    minutes = rng.choice([10, 15, 20, 30, 40])
    reason, reason_summary = rng.choice(LATE_REASONS)
    place = rng.choice(EATERIES)
    variant = rng.randrange(3)
    if variant == 0:
        turns = [(a, f"Sorry, {reason}, I'll be {minutes} minutes late"), (b, "No worries")]
        return turns, f"{a} will be {minutes} minutes late because {reason_summary}."
    if variant == 1:
        turns = [(a, f"Sorry, {reason}"), (a, f"I'll be about {minutes} minutes late"),
                 (b, "No worries, I'll order a drink"), (a, "Thanks, see you soon")]  # fmt: skip
        return turns, f"{a} will be {minutes} minutes late because {reason_summary}."
    turns = [(b, f"Where are you? I'm already at {place}"), (a, f"So sorry!! {sentence_start(reason)}"),
             (b, "How long?"), (a, f"{minutes} min max"), (b, "ok, I'll wait")]  # fmt: skip
    return turns, f"{a} is {minutes} minutes late to meet {b} at {place}. {b} will wait."


def birthday_gift(rng: random.Random, a: str, b: str, c: str) -> Scene:
    gift, other = rng.sample(GIFTS, 2)
    variant = rng.randrange(2)
    if variant == 0:
        turns = [(a, f"{c}'s birthday is next week, any gift ideas?"), (b, f"What about {other}?"),
                 (a, f"{c} already has one. Maybe {gift}?"), (b, "Good idea! Let's split it"),
                 (a, "Deal 🎁")]  # fmt: skip
        return turns, f"{a} and {b} will buy {gift} for {c}'s birthday and split the cost."
    turns = [(a, f"I got {gift} for {c}'s birthday 🎉"), (b, "Nice! How much was it?"),
             (a, rng.choice(PRICES)), (b, "I'll chip in half"), (a, "Thanks!")]  # fmt: skip
    return turns, f"{a} bought {gift} for {c}'s birthday and {b} will pay half."


def cancel_plans(rng: random.Random, a: str, b: str, c: str) -> Scene:
    reason, reason_summary = rng.choice(ILLNESSES)
    plan = rng.choice(["dinner", "the cinema", "the run", "drinks", "the gym", "the concert"])
    new_day = rng.choice(DAYS[2:])
    turns = [(a, f"I'm so sorry, I have to cancel {plan} tonight"), (b, "Oh no, what happened?"),
             (a, sentence_start(reason)), (b, "Don't worry. Another time?"),
             (a, f"Yes, how about {new_day}?"), (b, "Works for me")]  # fmt: skip
    if rng.randrange(2):
        turns = turns[:3] + [(b, f"No problem. Let's do it {new_day} instead")]
    summary = f"{a} cancels {plan} with {b} because {a} {reason_summary}. They will meet {new_day} instead."
    return turns, summary


def ask_recipe(rng: random.Random, a: str, b: str, c: str) -> Scene:
    dish, secret = rng.choice(DISHES)
    if rng.randrange(2) == 0:
        turns = [(a, f"Your {dish} was amazing yesterday 😍"), (a, "Can you send me the recipe?"),
                 (b, "Thank you! Sure, I'll send it tonight"), (b, f"The secret is {secret}")]  # fmt: skip
        return turns, f"{b} will send {a} the recipe for {dish} tonight. The secret is {secret}."
    turns = [(a, f"How do you make your {dish}?"), (b, f"It's easy, the trick is {secret}"),
             (a, "That's it?"), (b, "Pretty much 😄 I'll text you the full recipe")]  # fmt: skip
    return turns, f"{b} will text {a} the {dish} recipe; the trick is {secret}."


def lost_item(rng: random.Random, a: str, b: str, c: str) -> Scene:
    (item, it), spot = rng.choice(LOSABLES), rng.choice(LOST_SPOTS)
    if rng.randrange(2) == 0:
        turns = [(a, f"Have you seen my {item}? I can't find {it} anywhere"),
                 (b, f"I think you left {it} at {spot}"), (a, "Omg you're right, I'll go back"),
                 (b, "Good luck!")]  # fmt: skip
        return turns, f"{a} can't find the {item}. {b} thinks {a} left {it} at {spot}."
    turns = [(b, f"Did you lose your {item}? Someone found {it} at {spot}"),
             (a, "YES!! I've been looking all day"), (b, f"{c} has {it} now"),
             (a, f"I'll text {c}, thanks!")]  # fmt: skip
    return turns, f"Someone found {a}'s {item} at {spot}. {c} has {it} now."


def weekend_trip(rng: random.Random, a: str, b: str, c: str) -> Scene:
    dest = rng.choice(DESTINATIONS)
    transport, by = rng.choice(TRANSPORT)
    time = rng.choice(TIMES)
    turns = [(a, f"Shall we go to {dest} this weekend?"), (b, "I'd love to! How do we get there?"),
             (a, transport), (b, f"Great, let's leave on Saturday at {time}"), (a, "🙌")]  # fmt: skip
    if rng.randrange(2):
        turns.insert(2, (b, f"Can {c} come too?"))
        turns.insert(3, (a, "Of course"))
        return turns, f"{a}, {b} and {c} are going to {dest} {by} on Saturday at {time}."
    return turns, f"{a} and {b} are going to {dest} {by} this weekend, leaving on Saturday at {time}."


def work_deadline(rng: random.Random, a: str, b: str, c: str) -> Scene:
    doc, day = rng.choice(DOCUMENTS), rng.choice(DAYS[2:])
    time = rng.choice(TIMES)
    if rng.randrange(2) == 0:
        turns = [(a, f"When is the {doc} due?"), (b, f"The client moved it to {day.removeprefix('on ')}"),
                 (a, "Phew, more time"), (b, f"Can you send me your part by {time}?"),
                 (a, "Will do")]  # fmt: skip
        return turns, f"The {doc} is due {day}. {a} will send {b} their part by {time}."
    turns = [(a, f"{c} asked about the {doc}"), (a, "Are we on track?"),
             (b, "Almost, I need one more day"),
             (a, f"Ok, I'll tell {c} it will be ready {day}")]  # fmt: skip
    return turns, f"{b} needs one more day for the {doc}. {a} will tell {c} it will be ready {day}."


def pet_sitting(rng: random.Random, a: str, b: str, c: str) -> Scene:
    kind, pet = rng.choice(PETS)
    until = rng.choice(["Sunday", "Tuesday", "the end of the month", "next Friday"])
    turns = [(a, f"Could you look after {pet} while I'm away?"), (b, "Of course! Until when?"),
             (a, f"Until {until}. {pet} eats twice a day"),
             (b, f"No problem, I love that {kind} 🐾")]  # fmt: skip
    summary = f"{b} will look after {a}'s {kind} {pet} until {until}."
    if rng.randrange(2):
        turns.append((a, "I'll drop off the keys tomorrow"))
        summary += f" {a} will drop off the keys tomorrow."
    return turns, summary


def movie_choice(rng: random.Random, a: str, b: str, c: str) -> Scene:
    (title, genre), (other, other_genre) = rng.sample(MOVIES, 2)
    time = rng.choice(TIMES)
    turns = [(a, f"Movie night! {other} or {title}?"), (b, f"Not in the mood for a {other_genre}"),
             (b, f"{title} please"), (a, f"Ok, {title} at {time} then 🍿"), (b, "Yay")]  # fmt: skip
    return turns, f"{a} and {b} will watch {title} at {time}."


def car_trouble(rng: random.Random, a: str, b: str, c: str) -> Scene:
    problem, problem_summary = rng.choice(CAR_PROBLEMS)
    place = rng.choice(["work", "the airport", "the station", "school", "the hospital", "the office"])
    if rng.randrange(2) == 0:
        turns = [(a, f"My car {problem} 😫"), (a, f"Could you give me a lift to {place}?"),
                 (b, "Sure, I'll pick you up in 10 minutes"), (a, "Lifesaver!")]  # fmt: skip
        return turns, f"{a}'s car {problem_summary}, so {b} will drive {a} to {place}."
    turns = [(a, f"Ugh, my car {problem} again"), (b, f"Call {c}, {c} is a great mechanic"),
             (a, "Good idea, thanks")]  # fmt: skip
    return turns, f"{a}'s car {problem_summary}. {b} suggests calling {c}, who is a mechanic."


def exam_results(rng: random.Random, a: str, b: str, c: str) -> Scene:
    subject, grade = rng.choice(SUBJECTS), rng.choice(GRADES)
    variant = rng.randrange(4)
    if variant == 0:
        turns = [(a, f"I got {grade} in {subject}!!! 🥳"), (b, "Woohoo, well done!")]
        return turns, f"{a} got {grade} in {subject}."
    if variant < 3:
        turns = [(b, f"Did you get your {subject} results?"), (a, f"I passed!! Got {grade} 🎉"),
                 (b, "Congratulations!! We need to celebrate"), (a, "Drinks on me")]  # fmt: skip
        return turns, f"{a} passed the {subject} exam with {grade}."
    month = rng.choice(MONTHS)
    turns = [(b, f"How did the {subject} exam go?"), (a, "I failed 😞"), (b, "Oh no, I'm sorry"),
             (a, f"I can retake it in {month}"), (b, "You'll nail it next time")]  # fmt: skip
    return turns, f"{a} failed the {subject} exam and will retake it in {month}."


def shopping_list(rng: random.Random, a: str, b: str, c: str) -> Scene:
    store = rng.choice(STORES)
    first, second, third = rng.sample(GROCERIES, 3)
    turns = [(a, f"I'm at {store}, do we need anything?"), (b, f"{sentence_start(first)} and {second}"),
             (b, f"Oh and {third}"), (a, "Got it")]  # fmt: skip
    return turns, f"{a} is at {store} and will buy {first}, {second} and {third} for {b}."


def apartment_hunt(rng: random.Random, a: str, b: str, c: str) -> Scene:
    rooms, district = rng.choice(["two-room", "three-room", "one-bedroom", "studio"]), rng.choice(DISTRICTS)
    rent, day = rng.choice(RENTS), rng.choice(DAYS[2:])
    turns = [(a, f"I found a {rooms} flat in {district}!"), (b, "How much?"), (a, f"{rent} a month"),
             (b, "Not bad at all"), (a, f"The viewing is {day}, want to come?"), (b, "Sure")]  # fmt: skip
    return turns, f"{a} found a {rooms} flat in {district} for {rent} a month. {b} will see it {day} too."


def dinner_party(rng: random.Random, a: str, b: str, c: str) -> Scene:
    day, dessert = rng.choice(DAYS[2:]), rng.choice(DESSERTS)
    time = rng.choice(["6 pm", "7 pm", "7:30", "8 pm"])
    turns = [(a, f"Dinner at mine {day} at {time}? 🍝"), (b, "I'm in! What can I bring?"),
             (a, f"Maybe {dessert}?"), (c, "Count me in too"), (b, f"Ok, I'll make {dessert}")]  # fmt: skip
    return turns, f"{a} invites {b} and {c} for dinner {day} at {time}. {b} will bring {dessert}."


def play_sport(rng: random.Random, a: str, b: str, c: str) -> Scene:
    sport, day, time = rng.choice(SPORTS), rng.choice(DAYS), rng.choice(TIMES)
    turns = [(a, f"Up for some {sport} {day}?"), (b, "Always! When?"), (a, f"{time} at the sports centre"),
             (b, "I'll book the court")]  # fmt: skip
    summary = f"{a} and {b} will play {sport} at the sports centre {day} at {time}. {b} will book the court."
    return turns, summary


def parcel_pickup(rng: random.Random, a: str, b: str, c: str) -> Scene:
    spot = rng.choice(["the post office", "the neighbour's", "the reception desk", "the parcel locker"])
    if rng.randrange(2):
        turns = [(a, f"Could you grab my parcel from {spot} on your way home?"), (b, "Sure thing")]
        return turns, f"{b} will pick up {a}'s parcel from {spot} on the way home."
    turns = [(a, f"My parcel is waiting at {spot} and I'm stuck at work"), (a, "Could you pick it up?"),
             (b, "Sure, I'll get it on my way home"), (a, "Thank you!! 📦")]  # fmt: skip
    return turns, f"{b} will pick up {a}'s parcel from {spot} on the way home."


def concert_tickets(rng: random.Random, a: str, b: str, c: str) -> Scene:
    band, day, price = rng.choice(BANDS), rng.choice(DAYS[2:]), rng.choice(PRICES)
    turns = [(a, f"I got us two tickets to see {band} {day}!! 🎶"), (b, "No way! How much do I owe you?"),
             (a, price), (b, "Sending it now")]  # fmt: skip
    return turns, f"{a} bought two tickets to see {band} {day}. {b} owes {a} {price}."


def doctor_lift(rng: random.Random, a: str, b: str, c: str) -> Scene:
    day, time = rng.choice(DAYS[:3]), rng.choice(TIMES)
    turns = [(a, f"I have a dentist appointment {day} at {time}"), (a, "Can you watch the kids?"),
             (b, "Yes, I'll come over half an hour before"), (a, "Thanks, you're the best")]  # fmt: skip
    return turns, f"{a} has a dentist appointment {day} at {time}. {b} will watch the kids."


SCENARIOS: list[Callable[[random.Random, str, str, str], Scene]] = [
    meet_up, borrow, running_late, birthday_gift, cancel_plans, ask_recipe, lost_item, weekend_trip,
    work_deadline, pet_sitting, movie_choice, car_trouble, exam_results, shopping_list, apartment_hunt,
    dinner_party, play_sport, parcel_pickup, concert_tickets, doctor_lift,
]  # fmt: skip


def with_small_talk(rng: random.Random, turns: list[Turn], a: str, b: str, max_turns: int = 8) -> list[Turn]:
    """Wrap the core turns in optional greetings and thanks, never past `max_turns`."""
    opening = [(a, rng.choice(GREETINGS).format(other=b))]
    if rng.random() < 0.5:
        opening.append((b, rng.choice(GREETING_REPLIES).format(other=a)))
    closing = [(a, rng.choice(CLOSINGS))]
    if rng.random() < 0.5:
        closing.append((b, rng.choice(CLOSING_REPLIES)))
    if rng.random() < 0.35 and len(turns) + len(opening) <= max_turns:
        turns = opening + turns
    if rng.random() < 0.35 and len(turns) + len(closing) <= max_turns:
        turns = turns + closing
    return turns


def make_example(rng: random.Random) -> tuple[str, str]:
    """One (dialogue, summary) pair; dialogue lines are `Name: text` joined by newlines."""
    a, b, c = rng.sample(NAMES, 3)
    turns, summary = rng.choice(SCENARIOS)(rng, a, b, c)
    turns = with_small_talk(rng, turns, a, b)
    return "\n".join(f"{speaker}: {text}" for speaker, text in turns), summary


def build_splits(seed: int = DEFAULT_SEED, sizes: dict[str, int] = SPLIT_SIZES) -> dict[str, list[dict[str, str]]]:
    """Generate all splits from one seeded stream; no dialogue appears twice across splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, size in sizes.items():
        rows: list[dict[str, str]] = []
        while len(rows) < size:
            dialogue, summary = make_example(rng)
            if dialogue in seen:
                continue
            seen.add(dialogue)
            rows.append({"id": f"s-{split}-{len(rows) + 1:04d}", "dialogue": dialogue, "summary": summary})
        splits[split] = rows
    return splits


def dumps_split(rows: list[dict[str, str]]) -> str:
    """Serialise one split exactly as it is committed (stable bytes for the regeneration test)."""
    return json.dumps(rows, ensure_ascii=False, indent=1, allow_nan=False) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in build_splits(args.seed).items():
        path = args.out / f"{split}.json"
        path.write_text(dumps_split(rows), encoding="utf-8")
        logger.info("wrote %d examples to %s", len(rows), path)


if __name__ == "__main__":
    main()
