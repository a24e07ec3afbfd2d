"""Writes the hand-written fixtures of tests/unit/test_clean_rules.py (run once; the jsonl is committed).

Every record says what should happen to it: "expect" is "keep" or the rule (excluded/<rule>/) that
removes it. Two shards per language, so exact copies and near-duplicates cross shard boundaries."""
import json

ZH_KEEP = [
    "今天天气很好，我们一起去公园散步。公园里有很多人在锻炼身体，有的人在跑步，有的人在打太极拳。孩子们在草地上玩耍，笑声不断。我们走了一个小时，感觉非常舒服。",
    "这本书讲述了一个年轻人离开家乡去大城市打拼的故事。他在工厂里做过工人，也在餐馆里当过服务员。经过多年的努力，他终于开了一家自己的小店。作者用朴实的语言写出了普通人的梦想和坚持。",
    "学习一门外语需要耐心和方法。首先要多听多说，不要害怕犯错误。其次要坚持每天阅读，积累常用的词汇和句型。如果有机会和母语者交流，进步会更快。只要坚持下去，就一定能看到效果。",
    "黄河是中国的第二长河，全长约五千四百公里。它发源于青藏高原，流经九个省区，最后注入渤海。黄河流域是中华文明的重要发源地之一。由于河水中含有大量泥沙，所以它的颜色是黄色的。",
    "我的奶奶今年八十岁了，但是她的身体一直很健康。她每天早上五点起床，先在院子里浇花，然后给全家人做早饭。她常说，人老了也要有事情做，这样心情才会好。我们都很敬佩她。",
]
ZH_PII = ("如果你有任何问题，请联系我们的客服人员。电话是13812345678，邮箱是service@example.com。"
          "身份证号11010519491231002X只用于核对身份，我们会保护你的隐私，不会把信息告诉别人。")
ZH_NEAR = ZH_KEEP[1].replace("工人", "工友").replace("小店", "小馆")  # two words changed: a near-duplicate

EN_KEEP = [
    "The library in our town was built more than a hundred years ago. It has a large reading room with tall windows "
    "and wooden tables. Every Saturday morning there is a story hour for children. Volunteers read books aloud and "
    "the children draw pictures of the stories. Many people say that the library is the heart of the town.",
    "Learning to cook is one of the most useful skills a person can have. You can start with simple dishes such as "
    "soup, rice and eggs. It is important to taste the food while it is cooking. Over time you will learn which "
    "spices go well together. Cooking at home is also cheaper and healthier than eating out every day.",
    "The river that runs past the old mill has changed a lot over the years. In the past it was full of fish and the "
    "water was clear. Then factories were built upstream and the water became dirty. A group of citizens started to "
    "clean the banks and plant trees. Today the fish have come back and families walk along the river again.",
    "My grandfather taught me how to play chess when I was seven years old. He was a patient teacher and he never "
    "let me win on purpose. At first I lost every game, but slowly I learned to think a few moves ahead. When I won "
    "for the first time, he smiled and said that he was proud of me. I still play chess with him every summer.",
]


def zh_shards():
    s0 = [
        {"id": "zh-keep-0", "expect": "keep", "text": ZH_KEEP[0]},
        {"id": "zh-keep-1", "expect": "keep", "text": ZH_KEEP[1]},
        {"id": "zh-keep-2", "expect": "keep", "text": ZH_KEEP[2]},
        {"id": "zh-pii", "expect": "keep", "text": ZH_PII},
        {"id": "zh-short", "expect": "length", "text": "这段话太短了。"},
        {"id": "zh-english", "expect": "language", "text": EN_KEEP[0]},
        {"id": "zh-menu", "expect": "punctuation",
         "text": "首页 新闻中心 体育频道 娱乐八卦 财经要闻 科技前沿 汽车资讯 房产家居\n"
                 "教育培训 旅游攻略 美食天地 健康养生 时尚潮流 游戏动漫 读书文化 军事历史\n"
                 "联系我们 关于我们 网站地图 隐私政策 广告服务 招聘信息 友情链接 意见反馈"},
        {"id": "zh-digits", "expect": "ratios",
         "text": "订单编号是2023110512345678901234，金额为98765432元。物流单号是5566778899001122334455，"
                 "仓库编码是20231105998877665544。请核对以下数字：1234567890123456789012345678。"},
        {"id": "zh-bullets", "expect": "gopher_quality",
         "text": "• 新款苹果手机壳今天特价促销。\n• 华为无线蓝牙耳机限时打折中。\n• 小米智能手环买一送一活动。\n"
                 "• 联想笔记本电脑清仓大甩卖啦。\n• 格力空调冬季暖风机优惠多。\n• 海尔冰箱洗衣机套餐更划算。"},
        {"id": "zh-repeated", "expect": "gopher_repetition",
         "text": "我今天在公园里玩得很开心了。\n" * 6 + "我们明天还要再去一次，大家都很高兴。"},
        {"id": "zh-blacklist", "expect": "blacklist",
         "text": "这个网站提供在线赌博服务，注册就送大礼包。我们的平台安全可靠，每天都有很多人在这里赢钱。"
                 "欢迎新老朋友前来体验，客服全天在线为你服务。"},
    ]
    s1 = [
        {"id": "zh-keep-3", "expect": "keep", "text": ZH_KEEP[3]},
        {"id": "zh-keep-4", "expect": "keep", "text": ZH_KEEP[4]},
        {"id": "zh-exact-copy", "expect": "exact_dedup", "text": ZH_KEEP[0]},
        {"id": "zh-near-copy", "expect": "minhash_dedup", "text": ZH_NEAR},
        {"id": "zh-no-text", "expect": "record", "title": "只有标题"},
    ]
    return s0, s1


def en_shards():
    s0 = [
        {"id": "en-keep-0", "expect": "keep", "text": EN_KEEP[0]},
        {"id": "en-keep-1", "expect": "keep", "text": EN_KEEP[1]},
        {"id": "en-chinese", "expect": "language", "text": ZH_KEEP[0]},
        {"id": "en-short", "expect": "length", "text": "Too short to be a document."},
        {"id": "en-symbols", "expect": "ratios",
         "text": "Best deals today!!! $$$ ### @@@ %%% &&& *** +++ === ~~~ ^^^ <<< >>> $$$ ### @@@ %%% &&& *** "
                 "+++ === ~~~ ^^^ <<< >>> $$$ ### @@@ %%% &&& *** +++ === ~~~ ^^^ <<< >>> $$$ ### @@@ %%% &&& "
                 "*** +++ === ~~~ ^^^ <<< >>> Click here now to win a prize. Offer ends soon for everyone."},
        {"id": "en-no-stopwords", "expect": "gopher_quality",
         "text": "Cheap flights Paris London Berlin Rome. Discount hotels Madrid Lisbon Vienna Prague. Budget car "
                 "rental Amsterdam Brussels Zurich Geneva. Luxury cruises Caribbean Mediterranean Baltic Alaska. "
                 "Travel insurance quotes online instantly. Vacation packages families couples seniors students. "
                 "Last minute deals weekend getaways. Ski resorts Alps Rockies Pyrenees. Beach resorts Bali Phuket "
                 "Maldives Cancun. City breaks Dublin Edinburgh Copenhagen Stockholm Oslo Helsinki Warsaw Budapest."},
        {"id": "en-repeated", "expect": "gopher_repetition",
         "text": ("Buy now and save big on all of the products in the store today.\n" * 6)
                 + "This offer is valid while stocks last, so do not wait too long to get to the shop."},
        {"id": "en-lorem", "expect": "c4",
         "text": EN_KEEP[3] + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."},
        "{\"id\": \"en-broken\", \"text\": \"a line that is not valid JSON",
    ]
    s1 = [
        {"id": "en-keep-2", "expect": "keep", "text": EN_KEEP[2]},
        {"id": "en-exact-copy", "expect": "exact_dedup", "text": EN_KEEP[0]},
        {"id": "en-near-copy", "expect": "minhash_dedup",
         "text": EN_KEEP[1].replace("every day.", "every single day.").replace("eggs.", "eggs!")},
        {"id": "en-dup-line", "expect": "fineweb",
         "text": EN_KEEP[3].replace(". ", ".\n") + "\nI still play chess with him every summer."},
    ]
    return s0, s1


def write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


if __name__ == "__main__":
    import os

    for lang, shards in (("zh", zh_shards()), ("en", en_shards())):
        os.makedirs(lang, exist_ok=True)
        for i, records in enumerate(shards):
            write(f"{lang}/shard_{i}.jsonl", records)
    with open("blacklist.txt", "w", encoding="utf-8") as f:
        f.write("# one word or phrase a line\n赌博\ncasino\n")
